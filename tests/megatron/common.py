"""Shared tiny model and synthetic rollout data for the megatron tests."""

from __future__ import annotations

import torch

from megatron_rl.megatron.packing import TrainingSample

from megatron_rl.model_config import ModelConfig

# Qwen2-like (QKV bias) with QK-norm and GQA, untied; vocab 250 pads to 256 at TP 1 and 2 alike.
# (tests/megatron/test_step.py also trains a tied variant without QK-norm: a real Qwen2, exportable to HF.)
MODEL = dict(family="qwen2", vocab_size=250, hidden_size=64, ffn_hidden_size=128, num_layers=4,
             num_attention_heads=4, num_query_groups=2, add_qkv_bias=True, qk_layernorm=True,
             make_vocab_size_divisible_by=8, rope_theta=10000.0)
TOPK = 4
MAX_RESPONSE = 24


def model_cfg(**over) -> ModelConfig:
    return ModelConfig(**{**MODEL, **over})


def validate_setup(model_cfg: ModelConfig, cfg, max_sequence_length: int, tp: int = 1, pp: int = 1,
                   cp: int = 1) -> None:
    """The megatron layer's start-up checks of a layout and a StepConfig, before any process group or
    model exists (the trainer makes the same ones, in its own key names, in trainer/plan.py)."""
    from megatron_rl.megatron.packing import check_budget

    model_cfg.check_parallel(tp=tp, pp=pp)
    if cp > 1 and cfg.microbatch_tokens % (2 * cp):
        raise ValueError(f"microbatch_tokens={cfg.microbatch_tokens} must be a multiple of 2 x "
                         f"context_parallel_size={cp} (Megatron's load-balanced CP split)")
    check_budget([max_sequence_length], cfg.microbatch_tokens, 2 * cp if cp > 1 else 1)


def make_samples(n: int = 8, seed: int = 0, vocab: int = 250, lo: int = 6, hi: int = 22) -> list[TrainingSample]:
    """Sequences of prompt + response with per-token fields aligned with tokens.

    mu is synthetic: on half the tokens peaked and far from the tiny model's near-uniform pi, on the rest
    close to it, so every mode's trust-region mask rejects some tokens and keeps others, differently per
    mode: the layout comparisons exercise the masks, not just the plain policy gradient."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi, (1,), generator=g))
        p = int(torch.randint(2, 5, (1,), generator=g))
        tok = torch.randint(0, vocab, (L,), generator=g)
        mask = torch.zeros(L)
        mask[p:] = 1
        adv = torch.full((L,), float(torch.randn(1, generator=g)))
        ids = torch.stack([torch.randperm(vocab, generator=g)[:TOPK] for _ in range(L)])
        # half the tokens: a peaked mu (far from pi); the rest: mu close to the near-uniform pi
        peaked = torch.rand(L, 1, generator=g) < 0.5
        flat = (1.0 + 0.3 * torch.rand(L, TOPK, generator=g)) / vocab
        probs = torch.where(peaked, torch.softmax(torch.randn(L, TOPK, generator=g), -1) * 0.6, flat)
        probs, _ = probs.sort(dim=-1, descending=True)
        sampled = torch.where(peaked[:, 0], torch.rand(L, generator=g) * 0.3 + 1e-3,
                              (1.0 + 0.3 * torch.rand(L, generator=g)) / vocab)
        hit = ids == tok[:, None]
        sampled = torch.where(hit.any(-1), (probs * hit).sum(-1), sampled)
        out.append(TrainingSample(tokens=tok, loss_mask=mask, advantages=adv, rollout_logprobs=sampled.log(),
                                  rollout_topk_ids=ids, rollout_topk_logprobs=probs.log()))
    return out


def loss_cfgs():
    from megatron_rl.losses.config import LossConfig

    return {
        "ppo": LossConfig(mode="ppo"),
        "dppo_binary_tv": LossConfig(mode="dppo_binary_tv"),
        "dppo_topk_kl": LossConfig(mode="dppo_topk_kl", topk=TOPK),
        "cppo": LossConfig(mode="cppo", divergence="topk_tv", horizon="sequence", topk=TOPK),
    }


def pipeline_logits(model, ps, tokens: torch.Tensor, width: int) -> torch.Tensor:
    """Full logits [b, s, width] (width = padded vocabulary) of a bare GPTModel stage on every rank,
    through the pipeline by hand (p2p on the default group, no schedule). Collective over TP x PP."""
    import torch.distributed as dist

    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    pp_ranks = dist.get_process_group_ranks(ps.pp_group)
    if not ps.is_first_stage:
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(hidden, src=pp_ranks[ps.pp_rank - 1])
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(tokens, pos, None)
    logits = torch.empty(b, s, width, dtype=out.dtype)
    if not ps.is_last_stage:
        dist.send(out.contiguous(), dst=pp_ranks[ps.pp_rank + 1])
    else:
        parts = [torch.empty_like(out) for _ in range(ps.tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.tp_group)
        logits = torch.cat(parts, dim=-1)
    dist.broadcast(logits, src=pp_ranks[-1], group=ps.pp_group)
    return logits
