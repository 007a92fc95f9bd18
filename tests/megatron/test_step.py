"""One training step (forward, backward, distributed optimizer) is layout- and split-invariant.

Reference: TP1 PP1 DP1, one microbatch. Every other (TP, PP, DP) layout and 1 / 2 / 4 microbatches must
give the same loss (rtol 1e-5), grad norm (rtol 1e-5) and updated parameters (|diff| <= 2e-6 with
lr 1e-3, fp32, Adam eps 1e-4, clipping at 1.0 active), for ppo, dppo_binary_tv, dppo_topk_kl and cppo
(top-K TV, horizon `sequence`). Adam eps is 1e-4 rather than 1e-8 because the first Adam step is
g / (|g| + eps): with eps 1e-8 a gradient of 1e-9 (fp32 reduction-order noise) moves a weight by a
full lr. Plus: anchor `old` with 2 minibatches (pi_old recomputed once, fixed across both optimizer
steps), and bf16 (Float16Module) against the fp32 reference.

Launches: one process for the reference (also packed == unpacked logits), one of 2 ranks for
(2,1,1), (1,2,1), (1,1,2), one of 4 ranks for (2,2,1), (2,1,2), (1,2,2).
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

from .common import MAX_RESPONSE, make_samples, model_cfg

MODES = ("ppo", "dppo_binary_tv", "dppo_topk_kl", "cppo")
MICROBATCHES = (1, 2, 4)
LR, EPS = 1e-3, 1e-4
PARAM_ATOL = 2e-6
BUDGET = 160


def _cases():
    cases = [(mode, n, 1, False) for mode in MODES for n in MICROBATCHES]
    cases.append(("old", 2, 2, False))    # anchor = pi_old, 2 optimizer steps on one rollout batch
    cases.append(("ppo", 2, 1, True))     # bf16 params, fp32 main params and grads
    return cases


def _loss_cfg(mode):
    from megatron_rl.losses.config import LossConfig

    from .common import loss_cfgs
    if mode == "old":
        return LossConfig(mode="dppo_binary_tv", anchor="old")
    return loss_cfgs()[mode]


def _run_case(cfg, ps, mode, nmb, nminib, bf16, samples):
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.policy import logprob_fn, policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig, shard_for_dp
    from megatron_rl.megatron.training import OptimConfig, build_training

    chunks, opt = build_training(cfg, ps, OptimConfig(lr=LR, adam_eps=EPS, clip_grad=1.0, bf16=bf16),
                                 init=lambda m: init_params_(m, cfg, ps, seed=1))
    actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=BUDGET, num_microbatches=nmb,
                                                   num_minibatches=nminib, max_response_length=MAX_RESPONSE),
                  policy_loss_fn(cfg, ps, _loss_cfg(mode)))
    local = shard_for_dp(samples, nminib, ps.dp, ps.dp_rank)
    extra = {}
    if mode == "old":
        old = actor.compute_logprobs(local, logprob_fn(cfg, ps))
        if ps.is_last_stage:
            local = [dict(s, old_logprobs=o) for s, o in zip(local, old)]
            extra["old"] = [o.clone() for o in old]
    metrics = actor.train_on_rollout(local)
    if mode == "old":
        after = actor.compute_logprobs(local, logprob_fn(cfg, ps))   # every stage runs the pipeline
        if ps.is_last_stage:
            # the anchor is a field of the samples: untouched by the optimizer steps
            assert all(torch.equal(s["old_logprobs"], o) for s, o in zip(local, extra["old"]))
            extra["moved"] = max(float((a - o).abs().max()) for a, o in zip(after, extra["old"]))
    return chunks, metrics, extra


def packed_vs_unpacked(cfg, ps):
    """Max |logit difference| between 3 sequences packed in one row and each run alone."""
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.model import build_model
    from megatron_rl.megatron.packing import pack

    model = build_model(cfg, ps)
    init_params_(model, cfg, ps, seed=1)
    model.eval()
    samples = make_samples(n=3, seed=7)
    mb = pack(samples, [0, 1, 2], BUDGET)
    with torch.no_grad():
        packed = model(mb.tokens, mb.position_ids, mb.attention_mask)[0]
        worst, bounds = 0.0, mb.cu_seqlens.tolist()
        for j, s in enumerate(samples):
            L = s["tokens"].numel()
            alone = model(s["tokens"][None], torch.arange(L)[None], None)[0]
            worst = max(worst, float((packed[bounds[j]:bounds[j] + L] - alone).abs().max()))
    return worst


def body(rank, world, layouts, ref):
    from megatron_rl.megatron.init import global_name, shard_of_full
    from megatron_rl.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rl.megatron.training import unwrap

    cfg = model_cfg()
    samples = make_samples()
    out = {}
    for tp, pp in layouts:
        ps = initialize_parallel(tp=tp, pp=pp, model_cfg=cfg)
        if world == 1:
            out["packed_vs_unpacked"] = packed_vs_unpacked(cfg, ps)
        for case in _cases():
            chunks, metrics, extra = _run_case(cfg, ps, *case, samples)
            params = {global_name(n, cfg, ps): (n, p) for n, p in unwrap(chunks[0]).named_parameters()}
            key = (tp, pp, ps.dp) + case
            if ref is None:
                out[key] = (metrics, {g: p.detach().float().clone() for g, (n, p) in params.items()}, extra)
                continue
            r_metrics, r_params, _ = ref[("ref",) + case[:1] + case[3:]]
            diff = moved = 0.0
            for g, (n, p) in params.items():
                want = shard_of_full(n, p, r_params[g], cfg, ps)
                diff = max(diff, float((p.detach().float() - want).abs().max()))
            out[key] = (metrics, r_metrics, diff, extra)
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def reference():
    res = run_ranks(body, 1, args=([(1, 1)], None), timeout=300)[0]
    ref = {}
    packed_gap = res.pop("packed_vs_unpacked")
    assert packed_gap < 1e-5, packed_gap   # block-diagonal causal mask, positions running on: exact
    for (tp, pp, dp, mode, nmb, nminib, bf16), v in res.items():
        if nmb == (2 if mode == "old" or bf16 else 1):
            ref[("ref", mode, bf16)] = v
    return ref, res


def _check(per_rank):
    """Every rank's view of every case (a rank checks its own parameter shard)."""
    results = [(k, v) for res in per_rank for k, v in res.items()]
    assert len(results) == len(per_rank) * 3 * len(_cases())
    for key, (metrics, r_metrics, diff, extra) in results:
        bf16 = key[-1]
        rtol = 2e-2 if bf16 else 1e-5
        for m, r in zip(metrics, r_metrics):
            assert m["num_tokens"] == r["num_tokens"] and m["num_sequences"] == r["num_sequences"], key
            assert m["loss"] == pytest.approx(r["loss"], rel=rtol, abs=1e-6), (key, m, r)
            assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=rtol), (key, m, r)
        # bf16: within a few bf16 ulps of weights of size ~0.02-1.1 (2^-8 relative)
        assert diff <= (1e-2 if bf16 else PARAM_ATOL), (key, diff)


def test_reference_is_nontrivial_and_split_invariant(reference):
    ref, res = reference
    for (tp, pp, dp, mode, nmb, nminib, bf16), (metrics, params, extra) in res.items():
        r_metrics, r_params, _ = ref[("ref", mode, bf16)]
        for m, r in zip(metrics, r_metrics):
            assert m["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), (mode, nmb)
            assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5), (mode, nmb)
        assert max(float((params[k] - r_params[k]).abs().max()) for k in params) <= PARAM_ATOL, (mode, nmb)
        assert all(m["update_successful"] and m["grad_norm"] > 0 for m in metrics)
    # the modes really differ (their masks are active on this data) and the optimizer really moved
    losses = {m: ref[("ref", m, False)][0][0]["loss"] for m in MODES}
    assert len({round(v, 6) for v in losses.values()}) == len(MODES), losses
    old_metrics, _, old_extra = ref[("ref", "old", False)]
    assert len(old_metrics) == 2 and old_metrics[1]["iteration"] == 2
    assert old_extra["moved"] > 1e-4   # parameters moved, yet the anchor stayed the pre-update pi_old


def test_layouts_world2(reference):
    ref, _ = reference
    _check(run_ranks(body, 2, args=([(2, 1), (1, 2), (1, 1)], ref), timeout=400))


def test_layouts_world4(reference):
    ref, _ = reference
    _check(run_ranks(body, 4, args=([(2, 2), (2, 1), (1, 2)], ref), timeout=500))
