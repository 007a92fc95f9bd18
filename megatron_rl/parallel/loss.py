"""The whole policy loss on a vocab-parallel logits shard: identical loss and metrics on every TP rank.

    loss, metrics = vocab_parallel_policy_loss(logits_shard, batch, cfg, counts, shard, tp_group)

One fused vocabulary pass (vocab_parallel_token_stats) turns the shard into the per-token quantities the
losses need: log pi of the sampled token, log pi at the anchor's top-K ids (top-K divergences), the entropy
(bonus or metric), and, for the exact divergences only, pi's full log-probs (all-gathered; a mode for small
vocabularies, whose anchor already ships [N, V]). These are replicated on every TP rank, so
megatron_rl.losses.compute_policy_loss runs unchanged and returns the same loss on every rank; its
gradient reaches each rank's shard through the local backward of the fused pass (no communication).
The divergence D is computed detached by the losses: gradient flows through log pi (and the entropy).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rl.losses import GlobalCounts, LossConfig, PolicyInputs, compute_policy_loss
from megatron_rl.parallel.vocab_parallel import Temperature, VocabShard, _group_info, vocab_parallel_token_stats


@dataclass(frozen=True)
class PolicyBatch:
    """The rollout side of one microbatch, the same on every TP rank (packed layout: N tokens, S segments).

    targets [N] int: the sampled tokens a_t (the label of each logits row; PolicyInputs.tokens).
    rollout_logprobs [N] (mu), advantages [N], loss_mask [N], cu_seqlens [S+1] (None = one segment).
    old_logprobs [N]: pi_old, for anchor='old'. ref_logprobs [N]: KL-to-reference.
    topk_ids [N, K] int and anchor_topk_logprobs [N, K]: the anchor's top-K (vLLM's top-K of mu with
    anchor='rollout'; vocab_parallel_topk of pi_old with anchor='old', topk_ids_source='old').
    anchor_full_logprobs [N, vocab_size]: the anchor over the whole vocabulary (exact divergences only).
    seg_*: per-segment values of a context-parallel caller, passed through (see PolicyInputs).
    """

    targets: torch.Tensor
    rollout_logprobs: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    anchor_topk_logprobs: Optional[torch.Tensor] = None
    topk_ids_source: str = "rollout"
    anchor_full_logprobs: Optional[torch.Tensor] = None
    seg_num_tokens: Optional[torch.Tensor] = None
    seg_tokens_before: Optional[torch.Tensor] = None
    seg_prefix_z: Optional[torch.Tensor] = None
    seg_delta_b: Optional[torch.Tensor] = None
    seg_log_ratio_sum: Optional[torch.Tensor] = None

    def __post_init__(self):
        """Shape checks of what the vocabulary pass consumes (the rest is PolicyInputs' job). The batch is
        replicated over TP ranks, so these raise on every rank alike, before any collective."""
        t = self.targets
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"PolicyBatch.targets: expected an integer tensor [N], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if (self.topk_ids is None) != (self.anchor_topk_logprobs is None):
            raise ValueError("PolicyBatch.topk_ids and anchor_topk_logprobs: give both or neither")
        if self.topk_ids is not None:
            ids = self.topk_ids
            if ids.dim() != 2 or ids.shape[0] != t.shape[0] or ids.is_floating_point() or ids.dtype == torch.bool:
                raise ValueError(f"PolicyBatch.topk_ids: expected an integer tensor [{t.shape[0]}, K], got "
                                 f"{ids.dtype} {tuple(ids.shape)}")


_PASS_THROUGH = tuple(f.name for f in fields(PolicyBatch)
                      if f.name not in ("targets", "topk_ids", "anchor_topk_logprobs", "anchor_full_logprobs"))


def vocab_parallel_policy_loss(logits: torch.Tensor, batch: PolicyBatch, cfg: LossConfig, counts: GlobalCounts,
                               shard: VocabShard, group, *, temperature: Temperature = 1.0,
                               seq_first: bool = False, entropy_metric: bool = False,
                               chunk_rows: Optional[int] = None, inplace_backward: bool = False
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (fp32 scalar, with grad to `logits`) and metrics of any registered mode, identical on every TP rank.

    logits: this rank's shard [N, W] (tokens in the batch's order), or with seq_first=True Megatron's
        [s, b, W] for a batch packed from [b, s] (b-major); the per-token values are reordered, never
        the logits. W = shard.end - shard.start (padded vocabulary); ids >= vocab_size get no probability.
    temperature: the rollout engine's sampling temperature (logits / T, as vLLM's processed log-probs):
        a float, or a tensor [N] in batch order (per-request temperatures).
    entropy_metric: also compute the entropy when cfg.entropy_coef == 0, for the `entropy` metric.
    inplace_backward: the shard's gradient overwrites `logits` (Megatron's memory saving; only when nothing
        else reads the logits after the loss).
    Collectives: the fused pass's [tp, 7] validation all-reduce, MAX [N] and SUM [N, 2 + K (+1)]; the exact
    divergences add one all-gather of [N, W] log-probs. Backward: none.
    Errors (an id outside the vocabulary, a width that disagrees with `shard`, ranks that disagree on N)
    raise the same ValueError on every rank before any other collective.
    """
    if not isinstance(batch, PolicyBatch):
        raise ValueError(f"batch: expected a PolicyBatch, got {type(batch).__name__}")
    n_rows = logits[..., 0].numel() if logits.dim() >= 2 else -1
    if seq_first and logits.dim() != 3:
        raise ValueError(f"logits: seq_first=True needs [s, b, W], got {tuple(logits.shape)}")

    def to_rows(t: torch.Tensor) -> torch.Tensor:
        """Batch order [N, ...] -> the logits' row order (s-major when seq_first), shaped like the logits."""
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

    ids = batch.targets.reshape(-1, 1)
    k = 0
    if batch.topk_ids is not None:
        k = batch.topk_ids.shape[-1]
        ids = torch.cat([ids, batch.topk_ids.to(ids.dtype)], dim=1)
    if isinstance(temperature, torch.Tensor):       # per token, in batch order like the other fields
        temperature = to_rows(temperature)
    want_entropy = cfg.entropy_coef > 0 or entropy_metric
    stats = vocab_parallel_token_stats(logits, to_rows(ids), shard, group, temperature=temperature,
                                       entropy=want_entropy, chunk_rows=chunk_rows,
                                       inplace_backward=inplace_backward)
    lp = to_batch(stats.logprobs)
    extra = {}
    if k:
        extra.update(topk_ids=batch.topk_ids, anchor_topk_logprobs=batch.anchor_topk_logprobs,
                     topk_logprobs=lp[:, 1:])
    if want_entropy:
        extra["entropy"] = to_batch(stats.entropy)
    if batch.anchor_full_logprobs is not None:
        extra.update(anchor_full_logprobs=batch.anchor_full_logprobs,
                     full_logprobs=to_batch(_gather_full_logprobs(logits, stats.lse, shard, group, temperature)))
    inputs = PolicyInputs(logprobs=lp[:, 0], tokens=batch.targets,
                          **{name: getattr(batch, name) for name in _PASS_THROUGH}, **extra)
    return compute_policy_loss(cfg, inputs, counts)


@torch.no_grad()
def _gather_full_logprobs(logits, lse, shard: VocabShard, group, temperature) -> torch.Tensor:
    """pi's log-probs over the whole real vocabulary [*, vocab_size], detached (exact divergences only).

    The one place the full vocabulary exists on a rank, by definition of the exact modes: one
    all-gather of each shard's [N, W] log-probs (padding columns filled with -inf, then dropped).
    """
    x = logits.reshape(-1, shard.width)
    z = x.float()
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.reshape(-1, 1).float()
    elif temperature != 1.0:
        z = z / float(temperature)
    lp = z - lse.reshape(-1, 1)
    lp[:, shard.valid:] = -float("inf")
    _, tp = _group_info(group)
    if group is not None and tp > 1:
        out = torch.empty(tp * lp.shape[0], lp.shape[1], dtype=lp.dtype)
        dist.all_gather_into_tensor(out, lp.contiguous(), group=group)
        lp = out.view(tp, *lp.shape).permute(1, 0, 2).reshape(lp.shape[0], -1)
    return lp[:, : shard.vocab_size].reshape(*logits.shape[:-1], shard.vocab_size)
