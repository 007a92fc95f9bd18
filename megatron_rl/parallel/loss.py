"""The whole policy loss on a vocab-parallel logits shard: identical loss and metrics on every TP rank.

    loss, metrics = vocab_parallel_policy_loss(logits_shard, rollout, cfg, counts, shard, tp_group)

The one path from logits to loss: the Megatron step (megatron_rl.megatron.policy.policy_loss_fn) is a thin
adapter from its microbatch to this call. `rollout` holds the rollout side of the microbatch under
PolicyInputs' own field names (tokens, rollout_logprobs, advantages, loss_mask, cu_seqlens, ...); pi's side
(POLICY_FIELDS) is computed here from the logits, so the two sides together are exactly one PolicyInputs.

One fused vocabulary pass (vocab_parallel_token_stats) turns the shard into the per-token quantities the
losses need: log pi of the sampled token, log pi at the anchor's top-K ids (top-K divergences), the entropy
(bonus or metric), and, for the exact divergences only, pi's full log-probs (all-gathered; a mode for small
vocabularies, whose anchor already ships [N, V]). These are replicated on every TP rank, so
megatron_rl.losses.compute_policy_loss runs unchanged and returns the same loss on every rank; its
gradient reaches each rank's shard through the local backward of the fused pass (no communication).
The divergence D is computed detached by the losses: gradient flows through log pi (and the entropy).
Under context parallel (`cp_group`) the per-sequence values the loss needs across chunks are completed
by context_parallel.with_cp_fields between the vocabulary pass and the loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_rl.losses import GlobalCounts, LossConfig, PolicyInputs, compute_policy_loss
from megatron_rl.parallel.context_parallel import with_cp_fields
from megatron_rl.parallel.vocab_parallel import (Temperature, VocabShard, _group_info, _scale, _temp_rows,
                                                 vocab_parallel_token_stats)

# pi's side of PolicyInputs, computed here from the logits; every other field is the caller's `rollout`
POLICY_FIELDS = ("logprobs", "topk_logprobs", "full_logprobs", "entropy")
ROLLOUT_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyInputs) if f.name not in POLICY_FIELDS)


def _is_int_tensor(t, dim: int) -> bool:
    return (isinstance(t, torch.Tensor) and t.dim() == dim and not t.is_floating_point()
            and t.dtype != torch.bool)


def _check_rollout(rollout) -> torch.Tensor:
    """What the vocabulary pass reads from `rollout` (field names, tokens, top-K ids), checked before any
    collective; returns tokens. The rollout is replicated over TP ranks, so every rank raises alike.
    Everything else is PolicyInputs' validation, after the pass (also identical on every rank)."""
    if not isinstance(rollout, Mapping):
        raise ValueError(f"rollout: expected a mapping of PolicyInputs field names to tensors, got "
                         f"{type(rollout).__name__}")
    unknown = sorted(set(rollout) - set(ROLLOUT_FIELDS))
    if unknown:
        raise ValueError(f"rollout: unknown field(s) {unknown} ({', '.join(POLICY_FIELDS)} are computed from "
                         f"the logits); allowed: {', '.join(ROLLOUT_FIELDS)}")
    t = rollout.get("tokens")
    if not _is_int_tensor(t, 1):
        raise ValueError(f"rollout['tokens']: expected an integer tensor [N] (the sampled ids, one per logits "
                         f"row), got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    ids = rollout.get("topk_ids")
    if (ids is None) != (rollout.get("anchor_topk_logprobs") is None):
        raise ValueError("rollout['topk_ids'] and rollout['anchor_topk_logprobs']: give both or neither")
    if ids is not None and not (_is_int_tensor(ids, 2) and ids.shape[0] == t.shape[0]):
        raise ValueError(f"rollout['topk_ids']: expected an integer tensor [{t.shape[0]}, K], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    return t


def vocab_parallel_policy_loss(logits: torch.Tensor, rollout: Mapping[str, Any], cfg: LossConfig,
                               counts: GlobalCounts, shard: VocabShard, group, *,
                               temperature: Temperature = 1.0, seq_first: bool = False,
                               entropy_metric: bool = False, chunk_rows: Optional[int] = None,
                               inplace_backward: bool = False, cp_group=None, validate: bool = True
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (fp32 scalar, with grad to `logits`) and metrics of any registered mode, identical on every TP rank.

    logits: this rank's shard [N, W] (tokens in the rollout's order), or with seq_first=True Megatron's
        [s, b, W] for a batch packed from [b, s] (b-major); the per-token values are reordered, never
        the logits. W = shard.end - shard.start (padded vocabulary); ids >= vocab_size get no probability.
    rollout: PolicyInputs' fields other than POLICY_FIELDS, by name, the same on every TP rank: `tokens`
        [N] (the sampled ids: each logits row's label) and rollout_logprobs, advantages, loss_mask are
        required; cu_seqlens, old_logprobs (anchor='old'), ref_logprobs (KL), topk_ids + anchor_topk_logprobs
        (top-K divergences; ids from vLLM's top-K of mu, or vocab_parallel_topk of pi_old with
        topk_ids_source='old'), anchor_full_logprobs [N, vocab_size] (exact divergences), seg_* optional.
    temperature: the rollout engine's sampling temperature (logits / T, as vLLM's processed log-probs):
        a float, or a tensor [N] in the rollout's order (per-request temperatures).
    entropy_metric: also compute the entropy when cfg.entropy_coef == 0, for the `entropy` metric.
    inplace_backward: the shard's gradient overwrites `logits` (Megatron's memory saving; only when nothing
        else reads the logits after the loss: autograd's version counter rejects any other saved use).
    cp_group: context parallel. This rank's rows are its CP chunks (cu_seqlens: partition_index's local
        cu_seqlens) and the whole-sequence seg_* fields are filled in by with_cp_fields, with
        counts.max_response_length; every CP rank must call (one all-gather). None: no context parallel.
    Collectives: the fused pass's [tp, 7] validation all-reduce, MAX [N] and SUM [N, 2 + K (+1)]; the exact
    divergences add one all-gather of [N, W] log-probs; cp_group adds one all-gather of [N, 2 or 3] fp64
    over the CP group. Backward: none.
    Errors (a bad rollout field, an id outside the vocabulary, a width that disagrees with `shard`, ranks
    that disagree on N) raise the same ValueError on every rank before any other collective.
    validate=False skips the checks that read values on the host (the vocabulary pass's id / temperature
    facts, PolicyInputs' finiteness / mask / cu_seqlens values; the structural checks stay): the math is
    then free of host syncs, which is what a fake-tensor test of it needs. Only for inputs checked before.
    """
    tokens = _check_rollout(rollout)
    n_rows = math.prod(logits.shape[:-1]) if logits.dim() >= 2 else -1
    if seq_first and logits.dim() != 3:
        raise ValueError(f"logits: seq_first=True needs [s, b, W], got {tuple(logits.shape)}")

    def to_rows(t: torch.Tensor) -> torch.Tensor:
        """Rollout order [N, ...] -> the logits' row order (s-major when seq_first), shaped like the logits."""
        if t.shape[0] != n_rows:    # left alone: the fused pass's validation reports it on every rank
            return t
        tail = t.shape[1:]
        if seq_first:
            s, b = logits.shape[:2]
            return t.reshape(b, s, *tail).transpose(0, 1)
        return t.reshape(*logits.shape[:-1], *tail)

    def to_batch(t: torch.Tensor) -> torch.Tensor:
        """Inverse of to_rows for outputs [*lead, ...] -> [N, ...] (an autograd op on [N]-sized tensors)."""
        if seq_first:
            t = t.transpose(0, 1)
        return t.reshape(n_rows, *t.shape[logits.dim() - 1:])

    topk_ids = rollout.get("topk_ids")
    ids = tokens.reshape(-1, 1)
    if topk_ids is not None:
        ids = torch.cat([ids, topk_ids.to(ids.dtype)], dim=1)
    if isinstance(temperature, torch.Tensor):       # per token, in rollout order like the other fields
        temperature = to_rows(temperature)
    want_entropy = cfg.entropy_coef > 0 or entropy_metric
    stats = vocab_parallel_token_stats(logits, to_rows(ids), shard, group, temperature=temperature,
                                       entropy=want_entropy, chunk_rows=chunk_rows,
                                       inplace_backward=inplace_backward, validate=validate)
    lp = to_batch(stats.logprobs)
    pi = {"logprobs": lp[:, 0]}
    if topk_ids is not None:
        pi["topk_logprobs"] = lp[:, 1:]
    if want_entropy:
        pi["entropy"] = to_batch(stats.entropy)
    if rollout.get("anchor_full_logprobs") is not None:
        pi["full_logprobs"] = to_batch(_gather_full_logprobs(logits, stats.lse, shard, group, temperature))
    inputs = PolicyInputs(**rollout, **pi, check_values=validate)
    if cp_group is not None:   # whole-sequence CPPO scan / counts / GSPO sums across the CP chunks
        inputs = with_cp_fields(cfg, inputs, cp_group, counts.max_response_length)
    return compute_policy_loss(cfg, inputs, counts)


@torch.no_grad()
def _gather_full_logprobs(logits, lse, shard: VocabShard, group, temperature) -> torch.Tensor:
    """pi's log-probs over the whole real vocabulary [*, vocab_size], detached (exact divergences only).

    The one place the full vocabulary exists on a rank, by definition of the exact modes: one
    all-gather of each shard's [N, W] log-probs (padding columns filled with -inf, then dropped).
    """
    x = logits.reshape(-1, shard.width)
    z = _scale(x, _temp_rows(temperature, x.shape[0], x.device))   # the vocabulary pass's own z, bit for bit
    lp = z - lse.reshape(-1, 1)
    lp[:, shard.valid:] = -float("inf")
    _, tp = _group_info(group)
    if group is not None and tp > 1:
        out = torch.empty(tp * lp.shape[0], lp.shape[1], dtype=lp.dtype, device=lp.device)
        dist.all_gather_into_tensor(out, lp.contiguous(), group=group)
        lp = out.view(tp, *lp.shape).permute(1, 0, 2).reshape(lp.shape[0], -1)
    return lp[:, : shard.vocab_size].reshape(*logits.shape[:-1], shard.vocab_size)
