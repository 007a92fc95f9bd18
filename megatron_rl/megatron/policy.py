"""Loss functions for step.Actor: from this rank's vocabulary-parallel logits shard of one packed
microbatch to its contribution to the global loss (identical on every TP rank).

- `policy_loss_fn(...)`: the policy losses of megatron_rl.losses (ppo, dppo_*, cppo, ...), per
  microbatch on the last pipeline stage: an adapter from the microbatch to the one whole-loss path,
  megatron_rl.parallel.vocab_parallel_policy_loss (CPPO masks per microbatch, CP carry included).
  What it feeds the loss follows the mode's registry record (LossConfig.needs), never its name.
- `logprob_fn(...)`: log pi of the labels, for the pi_old recompute.
"""

from __future__ import annotations

import torch

from megatron_rl.losses.config import LossConfig
from megatron_rl.losses.inputs import GlobalCounts
from megatron_rl.model_config import ModelConfig
from megatron_rl.parallel.loss import vocab_parallel_policy_loss
from megatron_rl.parallel.vocab_parallel import VocabShard, vocab_parallel_token_stats

from .packing import Microbatch, row_cu_seqlens
from .parallel import ParallelState


def _shard(model_cfg: ModelConfig, ps: ParallelState) -> VocabShard:
    return VocabShard.megatron(ps.tp_rank, ps.tp, model_cfg.vocab_size, model_cfg.padded_vocab_size(ps.tp))


def _tp_group(ps: ParallelState):
    return ps.tp_group if ps.tp > 1 else None


def logprob_fn(model_cfg: ModelConfig, ps: ParallelState, temperature: float = 1.0):
    """(logits, mb) -> [S] log pi(label) at temperature: the pi_old recompute of Actor.compute_logprobs."""
    shard, group = _shard(model_cfg, ps), _tp_group(ps)

    def fn(logits: torch.Tensor, mb: Microbatch) -> torch.Tensor:
        return vocab_parallel_token_stats(logits, mb.labels[0][:, None], shard, group,
                                          temperature=temperature).logprobs[:, 0]
    return fn


def policy_loss_fn(model_cfg: ModelConfig, ps: ParallelState, loss_cfg: LossConfig, temperature: float = 1.0,
                   inplace_backward: bool = True, validate: bool = True):
    """The configured policy loss on one microbatch: megatron_rl.parallel.vocab_parallel_policy_loss fed
    from the microbatch. Fields read (aligned with the labels by packing): loss_mask, advantages,
    rollout_logprobs; old_logprobs (anchor 'old'); rollout_topk_ids and rollout_topk_logprobs (mu's top-K,
    for top-K divergences); ref_logprobs (kl_coef > 0). Under CP, the loss's CP hook gets the CP group.

    inplace_backward (default True): the vocabulary pass writes the logits' gradient over the logits, as
    megatron-core's vocab_parallel_cross_entropy does: no fresh [S, V/tp] gradient buffer (in fp32 the
    whole memory gap to megatron-core, and most of the time gap on CPU: docs/bench_vocab_parallel.md).
    Safe in Actor's step because nothing reads the logits after the loss: the output layer's backward
    needs its input and weight, not its output; the schedule keeps only the loss and the metrics; under
    bf16 the logits are Float16Module's fp32 copy, read by nobody else. A future reader that saved them
    for its backward would fail loudly on autograd's version counter, never silently. (Actor passes the
    logits as a view of the model output, so the gradient reaches the output layer without a copy.)
    Pass False to wrap this loss_fn in something that reads the logits after it.
    validate (default True): the loss's host-side value checks (ids in range, finite inputs; see
    vocab_parallel_policy_loss); False makes the adapter free of host syncs, for data validated before.
    """
    shard, group = _shard(model_cfg, ps), _tp_group(ps)
    cp_group = ps.cp_group if ps.cp > 1 else None
    need = loss_cfg.needs
    if need.full_logprobs:
        raise ValueError(f"LossConfig.mode={loss_cfg.mode!r} / divergence={need.divergence!r}: the exact "
                         f"divergences need the full vocabulary per token and are a single-process test "
                         f"oracle; not supported in the Megatron step")

    def fn(logits: torch.Tensor, mb: Microbatch, counts):
        f = {k: v[0] for k, v in mb.fields.items()}
        cu = mb.cp_local_cu if mb.cp_local_cu is not None else row_cu_seqlens(mb)
        rollout = dict(tokens=mb.labels[0], rollout_logprobs=f["rollout_logprobs"].float(),
                       advantages=f["advantages"].float(), loss_mask=f["loss_mask"] != 0, cu_seqlens=cu)
        if need.topk:
            if "rollout_topk_ids" not in f:
                raise ValueError(f"LossConfig.mode={loss_cfg.mode!r}: samples need `rollout_topk_ids` and "
                                 f"`rollout_topk_logprobs` (the rollout's top-K of mu)")
            rollout.update(topk_ids=f["rollout_topk_ids"].long(),
                           anchor_topk_logprobs=f["rollout_topk_logprobs"].float())
        for k in ("old_logprobs", "ref_logprobs"):
            if k in f:
                rollout[k] = f[k].float()
        gc = GlobalCounts(counts.num_tokens, counts.num_sequences, counts.max_response_length)
        loss, metrics = vocab_parallel_policy_loss(logits, rollout, loss_cfg, gc, shard, group,
                                                   temperature=temperature, inplace_backward=inplace_backward,
                                                   cp_group=cp_group, validate=validate)
        return loss, {k: v for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))
                      and (not isinstance(v, torch.Tensor) or v.numel() == 1)}
    return fn
