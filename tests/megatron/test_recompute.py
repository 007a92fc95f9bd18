"""Activation recompute (train.recompute) changes memory, never the numbers.

One real Megatron step (tiny model, fp32, gloo) with recompute `selective` (core attention) and `full`
(every layer, uniform, one layer per unit) must give the loss, the gradients (DDP's fp32 main grads
after the step's reduction) and the updated parameters of recompute `none`, rtol 1e-6, at TP 2 x DP 1
and TP 1 x DP 2 in one 2-rank launch. The non-distributed optimizer all-reduces, so every rank holds
the full gradient of its shard at both layouts. Each setting must also hold fewer bytes for backward
at its peak than `none` (autograd's saved tensors, counted through saved_tensors_hooks). Plus the start-up refusals of the model builder.
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

from .common import MAX_RESPONSE, make_samples, model_cfg

RECOMPUTE = ("none", "selective", "full")
BUDGET = 160
RTOL = 1e-6


class _SavedPeak:
    """Peak bytes of the tensors autograd holds for backward (each saved tensor counted while its holder
    lives): proof that a recompute setting really keeps less, so the equality below is not vacuous."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        return _Held(t, self)

    @staticmethod
    def unpack(held):
        return held.t


class _Held:
    def __init__(self, t, acc):
        self.t, self.acc, self.n = t, acc, t.numel() * t.element_size()
        acc.live += self.n
        acc.peak = max(acc.peak, acc.live)

    def __del__(self):
        self.acc.live -= self.n


def one_step(cfg, ps, recompute, samples):
    """(metrics, {name: main grad}, {name: updated param}, peak saved bytes) of one optimizer step."""
    from megatron_rl.losses.config import LossConfig
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.policy import policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig, shard_for_dp
    from megatron_rl.megatron.training import OptimConfig, build_training, unwrap

    optim = OptimConfig(lr=1e-3, adam_eps=1e-4, clip_grad=1.0, use_distributed_optimizer=False)
    chunks, opt = build_training(cfg, ps, optim, init=lambda m: init_params_(m, cfg, ps, seed=1),
                                 recompute=recompute)
    config = unwrap(chunks[0]).config
    assert config.recompute_granularity == (None if recompute == "none" else recompute)
    actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=BUDGET, num_microbatches=2,
                                                   max_response_length=MAX_RESPONSE),
                  policy_loss_fn(cfg, ps, LossConfig(mode="dppo_binary_tv")))
    saved = _SavedPeak()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        metrics = actor.train_minibatch(shard_for_dp(samples, 1, ps.dp, ps.dp_rank))
    # the grad buffer keeps the step's reduced gradients until the next zero_grad_buffer
    params = dict(unwrap(chunks[0]).named_parameters())
    grads = {n: p.main_grad.detach().clone() for n, p in params.items()}
    return metrics, grads, {n: p.detach().clone() for n, p in params.items()}, saved.peak


def body(rank, world):
    from megatron_rl.megatron.parallel import destroy_parallel, initialize_parallel

    cfg = model_cfg()
    samples = make_samples()
    worst = {}
    for tp in (2, 1):
        ps = initialize_parallel(tp=tp, model_cfg=cfg)
        ref_metrics, ref_grads, ref_params, ref_peak = one_step(cfg, ps, "none", samples)
        assert max(float(g.abs().max()) for g in ref_grads.values()) > 0   # a step that moves something
        for recompute in RECOMPUTE[1:]:
            metrics, grads, params, peak = one_step(cfg, ps, recompute, samples)
            assert peak < ref_peak, (recompute, peak, ref_peak)
            assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=RTOL, abs=1e-9), recompute
            assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=RTOL), recompute
            for n in ref_grads:
                torch.testing.assert_close(grads[n], ref_grads[n], rtol=RTOL, atol=1e-9, msg=f"{recompute} {n}")
                torch.testing.assert_close(params[n], ref_params[n], rtol=RTOL, atol=1e-9, msg=f"{recompute} {n}")
            worst[(tp, recompute)] = (max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads),
                                      peak / ref_peak)
        destroy_parallel()
    return worst


def test_recompute_gives_the_same_loss_and_gradients_at_tp1_and_tp2():
    results = run_ranks(body, 2, timeout=240)
    print("max |grad - grad(none)|, peak saved bytes / none's:", results[0])
    assert all(set(r) == {(tp, m) for tp in (1, 2) for m in RECOMPUTE[1:]} for r in results)


def refusals(rank, world):
    from megatron_rl.megatron.model import build_model
    from megatron_rl.megatron.parallel import destroy_parallel, initialize_parallel

    cfg = model_cfg()
    errors = {}
    for tp, kwargs in ((1, dict(recompute="some")), (1, dict(sequence_parallel=True)),
                       (2, dict(sequence_parallel=True, use_te=False))):
        ps = initialize_parallel(tp=tp, model_cfg=cfg)
        with pytest.raises(ValueError) as e:
            build_model(cfg, ps, **kwargs)
        errors[(tp, tuple(kwargs))] = str(e.value)
        destroy_parallel()
    return errors


def test_bad_memory_options_are_refused_naming_the_setting():
    errors = run_ranks(refusals, 2, timeout=120)[0]
    assert "train.recompute" in errors[(1, ("recompute",))]
    assert "needs tensor_model_parallel_size > 1" in errors[(1, ("sequence_parallel",))]
    assert "parallel.sequence_parallel" in errors[(1, ("sequence_parallel",))]
    sp_cpu = errors[(2, ("sequence_parallel", "use_te"))]
    assert "transformer-engine layer spec on GPU" in sp_cpu and "parallel.sequence_parallel: false" in sp_cpu
