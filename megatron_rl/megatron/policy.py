"""Loss functions for step.Actor: from this rank's vocabulary-parallel logits shard of one packed
microbatch to its contribution to the global loss (identical on every TP rank).

- `policy_loss_fn(...)`: the policy losses of megatron_rl.losses (ppo, dppo_*, cppo, ...), per
  microbatch on the last pipeline stage; CPPO masks are computed here per microbatch.
- `token_loss_fn(...)`: -A_t * log pi(a_t), token-mean over global counts; a plain baseline for tests.
"""

from __future__ import annotations

import torch

from megatron_rl.losses.config import LossConfig
from megatron_rl.losses.inputs import GlobalCounts, PolicyInputs
from megatron_rl.model_config import ModelConfig
from megatron_rl.parallel.context_parallel import with_cp_fields
from megatron_rl.parallel.vocab_parallel import VocabShard, vocab_parallel_token_stats

from .packing import Microbatch
from .parallel import ParallelState


def _shard(model_cfg: ModelConfig, ps: ParallelState) -> VocabShard:
    return VocabShard.megatron(ps.tp_rank, ps.tp, model_cfg.vocab_size, model_cfg.padded_vocab_size(ps.tp))


def _tp_group(ps: ParallelState):
    return ps.tp_group if ps.tp > 1 else None


def full_cu_seqlens(mb: Microbatch) -> torch.Tensor:
    """The row's segments plus its padding tail as one more (loss-free) segment, covering all S tokens."""
    cu = mb.cu_seqlens.to(torch.int64)
    if int(cu[-1]) < mb.num_tokens:
        cu = torch.cat([cu, cu.new_tensor([mb.num_tokens])])
    return cu


def logprob_fn(model_cfg: ModelConfig, ps: ParallelState, temperature: float = 1.0):
    """(logits, mb) -> [S] log pi(label) at temperature: the pi_old recompute of Actor.compute_logprobs."""
    shard, group = _shard(model_cfg, ps), _tp_group(ps)

    def fn(logits: torch.Tensor, mb: Microbatch) -> torch.Tensor:
        return vocab_parallel_token_stats(logits, mb.labels[0][:, None], shard, group,
                                          temperature=temperature).logprobs[:, 0]
    return fn


def token_loss_fn(model_cfg: ModelConfig, ps: ParallelState, temperature: float = 1.0):
    shard, group = _shard(model_cfg, ps), _tp_group(ps)

    def fn(logits: torch.Tensor, mb: Microbatch, counts):
        lp = vocab_parallel_token_stats(logits, mb.labels[0][:, None], shard, group,
                                        temperature=temperature).logprobs[:, 0]
        m = mb.fields["loss_mask"][0].to(lp.dtype)
        adv = mb.fields["advantages"][0].to(lp.dtype)
        loss = -(adv * lp * m).sum() / counts.num_tokens.clamp(min=1).to(lp.dtype)
        return loss, {}
    return fn


def policy_loss_fn(model_cfg: ModelConfig, ps: ParallelState, loss_cfg: LossConfig, temperature: float = 1.0):
    """The configured policy loss on one microbatch. Fields read from the microbatch (aligned with the
    labels by packing): loss_mask, advantages, rollout_logprobs; old_logprobs (anchor 'old'); topk_ids
    and topk_logprobs (the rollout's top-K of mu, for top-K divergences); ref_logprobs (kl_coef > 0)."""
    from megatron_rl.losses import compute_policy_loss

    shard, group = _shard(model_cfg, ps), _tp_group(ps)
    div = loss_cfg.divergence_name or ""
    need_topk = div.startswith("topk")
    if div.startswith("exact"):
        raise ValueError(f"LossConfig.mode={loss_cfg.mode!r} / divergence={div!r}: the exact divergences need "
                         f"the full vocabulary per token and are a single-process test oracle; not supported "
                         f"in the Megatron step")
    need_entropy = loss_cfg.entropy_coef > 0

    def fn(logits: torch.Tensor, mb: Microbatch, counts):
        f = {k: v[0] for k, v in mb.fields.items()}
        labels = mb.labels[0]
        ids = labels[:, None]
        if need_topk:
            if "topk_ids" not in f:
                raise ValueError(f"LossConfig.mode={loss_cfg.mode!r}: samples need `topk_ids` and "
                                 f"`topk_logprobs` (the rollout's top-K)")
            ids = torch.cat([ids, f["topk_ids"].long()], dim=1)
        stats = vocab_parallel_token_stats(logits, ids, shard, group, temperature=temperature,
                                           entropy=need_entropy)
        lp = stats.logprobs.float()
        extra = {}
        if need_topk:
            extra.update(topk_ids=f["topk_ids"].long(), topk_logprobs=lp[:, 1:],
                         anchor_topk_logprobs=f["topk_logprobs"].float(), tokens=labels)
        for k in ("old_logprobs", "ref_logprobs"):
            if k in f:
                extra[k] = f[k].float()
        cu = mb.cp_local_cu if mb.cp_local_cu is not None else full_cu_seqlens(mb)
        inputs = PolicyInputs(logprobs=lp[:, 0], rollout_logprobs=f["rollout_logprobs"].float(),
                              advantages=f["advantages"].float(), loss_mask=f["loss_mask"] != 0,
                              cu_seqlens=cu, entropy=stats.entropy, **extra)
        if ps.cp > 1:   # whole-sequence CPPO scan / counts across the CP chunks (one all-gather)
            inputs = with_cp_fields(loss_cfg, inputs, ps.cp_group, counts.max_response_length)
        gc = GlobalCounts(counts.num_tokens, counts.num_sequences, counts.max_response_length)
        loss, metrics = compute_policy_loss(loss_cfg, inputs, gc)
        return loss, {k: v for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))
                      and (not isinstance(v, torch.Tensor) or v.numel() == 1)}
    return fn
