"""Shared helpers for the multi-rank vocab-parallel tests: groups, full logits, single-process references.

Tolerances (used everywhere in tests/parallel):
- values and gradients computed from fp32 (or bf16-upcast) logits: rtol 1e-5, atol 1e-6. The relative
  bound is the issue's; the absolute floor is needed where relative error is meaningless: a log-prob is
  z - lse with |lse| ~ 10-20 here, so its rounding error is ~ 16 * fp32 eps * |lse| ~ 1e-6 absolute
  whatever its own size (log p ~ 0 for p ~ 1, an entropy near 0, gradient entries g - p G that cancel).
  The shard split only changes the summation order of sum-exp; both sides round in fp32.
- gradients returned in bf16: the reference fp32 gradient rounded to bf16, within one bf16 ulp
  (rtol 2**-7): ours and the reference round two fp32 values that differ by ~1e-7 relative, which can land
  on either side of a bf16 rounding boundary; plus the same 1e-6 absolute floor for entries that are a
  cancellation (e.g. the entropy gradient -p (log p + H) at a near-one-hot token).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.parallel import VocabShard

RTOL, ATOL = 1e-5, 1e-6
BF16_RTOL = 2.0 ** -7


def padded(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padding (megatron_rl.model_config.ModelConfig.padded_vocab_size)."""
    m = divisible_by * tp
    return -(-vocab // m) * m


def tp_groups(world: int, sizes=(1, 2, 4)):
    """Every rank creates every group (new_group is collective); returns {tp: (group, rank_in_group)}."""
    rank = dist.get_rank()
    mine = {}
    for tp in sizes:
        if world % tp:
            continue
        for first in range(0, world, tp):
            ranks = list(range(first, first + tp))
            g = dist.new_group(ranks)
            if rank in ranks:
                mine[tp] = (g, ranks.index(rank))
    return mine


def full_logits(n: int, vocab: int, vpad: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """The same [n, vpad] logits on every rank: varied scales (peaked rows, a near-one-hot row, a flat
    row) and padding columns set far ABOVE every real logit, so any leak of probability onto padding shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vpad, generator=g) * torch.linspace(0.5, 6.0, n)[:, None]
    x[0, 3] = 40.0                 # p(3) ~ 1
    if n > 2:
        x[1] = 0.25                # uniform row
    x[:, vocab:] = 60.0            # padding: must never receive probability
    return x.to(dtype)


def shard_of(x_full: torch.Tensor, vocab: int, tp: int, r: int) -> tuple[torch.Tensor, VocabShard]:
    shard = VocabShard.megatron(r, tp, vocab, x_full.shape[-1])
    return x_full[..., shard.start:shard.end].clone(), shard


def boundary_ids(n: int, k: int, vocab: int, vpad: int, seed: int) -> torch.Tensor:
    """[n, k] ids: every shard boundary for tp in {1, 2, 4} (last id of one shard, first of the next),
    0 and vocab-1, duplicates in every row, the rest random."""
    g = torch.Generator().manual_seed(seed)
    special = {0, vocab - 1}
    for tp in (2, 4):
        per = vpad // tp
        for b in range(per, vpad, per):
            special |= {b - 1, b}
    special = sorted(i for i in special if i < vocab)
    ids = torch.randint(0, vocab, (n, k), generator=g)
    for row in range(n):
        for j in range(min(k - 1, len(special))):
            ids[row, j] = special[(row + j) % len(special)]
        ids[row, k - 1] = ids[row, 0]          # a duplicated id in every row
    return ids


def ref_logp(x_full: torch.Tensor, vocab: int, temperature) -> torch.Tensor:
    """Single-process reference: log_softmax over the real vocabulary of float32(logits) / T."""
    z = x_full[..., :vocab].float()
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.float().unsqueeze(-1)
    elif temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def ref_entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def assert_grad_close(ours: torch.Tensor, ref_full: torch.Tensor, shard: VocabShard, what: str):
    """Shard gradient vs the reference's columns of this shard; padding columns exactly zero."""
    v = shard.valid
    expect = torch.zeros(ours.shape, dtype=torch.float32)
    expect[..., :v] = ref_full[..., shard.start:shard.start + v]
    if ours.dtype == torch.bfloat16:
        torch.testing.assert_close(ours, expect.to(torch.bfloat16), rtol=BF16_RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(ours, expect, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    assert (ours[..., v:] == 0).all(), f"{what}: padding columns got a gradient"
