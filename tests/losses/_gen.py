"""Random test data for the loss tests (data only: every reference computation lives in the tests)."""

from __future__ import annotations

import torch

from megatron_rl.losses import PolicyInputs


def random_dists(gen: torch.Generator, n: int, v: int, spread: float = 0.5, scale: float = 2.0):
    """(mu, pi) full log-prob tables [n, v] (fp64): pi is mu's logits plus noise of size `spread`."""
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    mu = torch.log_softmax(logits, -1)
    pi = torch.log_softmax(logits + spread * torch.randn(n, v, generator=gen, dtype=torch.float64), -1)
    return mu, pi


def random_batch(gen: torch.Generator, lengths, v: int = 8, k: int = 3, mask_p: float = 0.85,
                 spread: float = 0.5, with_old: bool = False, requires_grad: bool = True) -> dict:
    """Kwargs for PolicyInputs over packed segments of the given lengths: tokens sampled from mu, the top-K
    of mu, full tables for the exact divergences, a random loss mask and per-sequence advantages."""
    lengths = list(lengths)
    n = sum(lengths)
    mu, pi = random_dists(gen, n, v, spread)
    tokens = torch.multinomial(mu.exp(), 1, generator=gen).squeeze(1) if n else torch.zeros(0, dtype=torch.long)
    topk_ids = mu.topk(k, dim=-1).indices
    seq_adv = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    adv = torch.repeat_interleave(seq_adv, torch.tensor(lengths, dtype=torch.long), output_size=n)
    mask = torch.rand(n, generator=gen) < mask_p
    lp = pi.gather(1, tokens[:, None]).squeeze(1).float()
    out = dict(
        logprobs=lp.clone().requires_grad_(requires_grad),
        rollout_logprobs=mu.gather(1, tokens[:, None]).squeeze(1).float(),
        advantages=adv.float(),
        loss_mask=mask,
        cu_seqlens=torch.tensor([0] + lengths).cumsum(0),
        tokens=tokens,
        topk_ids=topk_ids,
        anchor_topk_logprobs=mu.gather(1, topk_ids).float(),
        topk_logprobs=pi.gather(1, topk_ids).float(),
        full_logprobs=pi.float(),
        anchor_full_logprobs=mu.float(),
    )
    if with_old:
        old = torch.log_softmax(mu + 0.3 * torch.randn(n, v, generator=gen, dtype=torch.float64), -1)
        out["old_logprobs"] = old.gather(1, tokens[:, None]).squeeze(1).float()
    return out


def inputs(**kw) -> PolicyInputs:
    return PolicyInputs(**kw)
