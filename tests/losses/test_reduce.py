"""Aggregation with caller-supplied global counts (algorithms.md Sec. 5): hand values, microbatch and
context-parallel splits that sum to the global loss exactly, empty and all-masked batches."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.losses import (AGG_MODES, MODES, GlobalCounts, LossConfig, PolicyInputs, binary_tv,
                                compute_policy_loss, cppo_mask)

from ._gen import random_batch


@pytest.mark.parametrize("agg, expected", [
    ("token-mean", -7 / 3), ("seq-mean-token-sum", -3.5), ("seq-mean-token-mean", -2.75),
    ("seq-mean-token-sum-norm", -0.7),
])
def test_agg_modes_hand(agg, expected):
    # surrogate pg_is with r = 1: loss_t = -A_t; tokens (1, 2, [3 masked]) | (4); L = 5
    lp = torch.full((4,), math.log(0.5), requires_grad=True)
    inp = PolicyInputs(logprobs=lp, rollout_logprobs=lp.detach().clone(), advantages=torch.tensor([1., 2., 3., 4.]),
                       loss_mask=torch.tensor([1, 1, 0, 1]), cu_seqlens=torch.tensor([0, 3, 4]))
    loss, met = compute_policy_loss(LossConfig(mode="pg_is", loss_form="surrogate", loss_agg_mode=agg), inp,
                                    GlobalCounts(num_tokens=3, num_sequences=2, max_response_length=5))
    assert loss.item() == pytest.approx(expected)
    assert met["pg_loss"].item() == pytest.approx(expected)


def _cfg(mode, **kw):
    kw.setdefault("topk", 3)
    if mode == "cispo":
        kw["tis_cap"] = 3.0
    return LossConfig(mode=mode, **kw)


def _merge(metric_dicts):
    out = {}
    for d in metric_dicts:
        for k, v in d.items():
            out[k] = torch.maximum(out[k], v) if k in out and k.endswith("_max") else out.get(k, 0) + v
    return out


def _run(cfg, data, counts):
    inp = PolicyInputs(**data)
    loss, met = compute_policy_loss(cfg, inp, counts)
    return loss, met


@settings(max_examples=24, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(MODES), agg=st.sampled_from(AGG_MODES),
       horizon=st.sampled_from(["sequence", "max"]))
def test_microbatch_split_sums_to_the_global_loss(seed, mode, agg, horizon):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 20, (6,), generator=gen).tolist()
    full = random_batch(gen, lengths, v=10, k=3, spread=0.8, requires_grad=False)
    full["ref_logprobs"] = full["rollout_logprobs"] - 0.05
    full["entropy"] = torch.rand(sum(lengths), generator=gen)
    counts = GlobalCounts(num_tokens=int(full["loss_mask"].sum()), num_sequences=6, max_response_length=20)
    cfg = _cfg(mode, loss_agg_mode=agg, horizon=horizon, kl_coef=0.05, entropy_coef=0.01,
               delta_b_mode="p90" if seed % 2 else "fixed")
    lp = full.pop("logprobs")
    x = lp.clone().requires_grad_()
    loss, met = _run(cfg, dict(full, logprobs=x), counts)
    (g,) = torch.autograd.grad(loss, x)
    # microbatches of whole sequences: [0, 2), [2, 3), [3, 6)
    cu = full["cu_seqlens"].tolist()
    total, grads, mets = 0.0, [], []
    for a, b in [(0, 2), (2, 3), (3, 6)]:
        t0, t1 = cu[a], cu[b]
        part = {k: v[t0:t1] for k, v in full.items() if k != "cu_seqlens"}
        part["cu_seqlens"] = torch.tensor(cu[a:b + 1]) - t0
        xp = lp[t0:t1].clone().requires_grad_()
        lo, mp = _run(cfg, dict(part, logprobs=xp), counts)
        grads.append(torch.autograd.grad(lo, xp)[0])
        total = total + lo.detach()
        mets.append(mp)
    assert torch.allclose(total, loss.detach(), atol=1e-6, rtol=1e-5)
    assert torch.allclose(torch.cat(grads), g, atol=1e-7)
    merged = _merge(mets)
    assert merged.keys() == met.keys()
    for k in met:
        assert torch.allclose(torch.as_tensor(merged[k]), met[k], atol=1e-6, rtol=1e-5), k


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["cppo", "gspo", "ppo", "dppo_topk_tv"]),
       agg=st.sampled_from(AGG_MODES), horizon=st.sampled_from(["sequence", "max"]),
       delta_b_mode=st.sampled_from(["fixed", "p90"]))
def test_context_parallel_split_with_segment_overrides(seed, mode, agg, horizon, delta_b_mode):
    """Each sequence cut in two; rank 0 holds the first chunks, rank 1 the rest. With the per-segment
    overrides a CP caller computes, the two ranks' losses and metrics sum to the whole batch's exactly."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (4,), generator=gen).tolist()
    full = random_batch(gen, lengths, v=10, k=3, spread=0.5, requires_grad=False)
    lp = full.pop("logprobs")
    counts = GlobalCounts(num_tokens=int(full["loss_mask"].sum()), num_sequences=4, max_response_length=24)
    cfg = _cfg(mode, loss_agg_mode=agg, horizon=horizon, delta_b_mode=delta_b_mode, delta_b=0.01)
    x = lp.clone().requires_grad_()
    loss, met = _run(cfg, dict(full, logprobs=x), counts)
    (g,) = torch.autograd.grad(loss, x)

    cu = full["cu_seqlens"].tolist()
    m = full["loss_mask"]
    cuts = [a + int(torch.randint(0, b - a + 1, (1,), generator=gen)) for a, b in zip(cu[:-1], cu[1:])]
    # what the CP caller computes: whole-sequence counts, the anchor divergence's whole-sequence delta_b,
    # the GSPO log-ratio sums, and the CPPO carries from a first pass over the first chunks (z_sum)
    seg_tok = torch.tensor([int(m[a:b].sum()) for a, b in zip(cu[:-1], cu[1:])])
    d_full = binary_tv(lp, full["rollout_logprobs"])
    whole = cppo_mask(d_full, m, full["cu_seqlens"], delta=0.15, horizon=horizon, max_response_length=24,
                      delta_b_mode=delta_b_mode, delta_b=0.01, seg_num_tokens=seg_tok)
    lr_sum = torch.stack([torch.where(m[a:b], lp[a:b] - full["rollout_logprobs"][a:b], 0.0).sum()
                          for a, b in zip(cu[:-1], cu[1:])])
    ranks = []
    for r in (0, 1):
        spans = [(a, c) if r == 0 else (c, b) for a, b, c in zip(cu[:-1], cu[1:], cuts)]
        idx = torch.cat([torch.arange(a, b) for a, b in spans])
        part = {k: v[idx] for k, v in full.items() if k != "cu_seqlens"}
        part["cu_seqlens"] = torch.tensor([0] + [b - a for a, b in spans]).cumsum(0)
        part["seg_num_tokens"] = seg_tok
        part["seg_tokens_before"] = torch.tensor([int(m[a:s].sum()) for (s, _), a in zip(spans, cu[:-1])])
        part["seg_delta_b"] = whole.delta_b
        part["seg_log_ratio_sum"] = lr_sum
        ranks.append((idx, part))
    # CPPO carry for rank 1 = rank 0's z_sum per segment (an exclusive scan over two ranks)
    idx0, p0 = ranks[0]
    first = cppo_mask(binary_tv(lp[idx0], p0["rollout_logprobs"]), p0["loss_mask"], p0["cu_seqlens"], delta=0.15,
                      horizon=horizon, max_response_length=24, seg_num_tokens=seg_tok,
                      seg_tokens_before=p0["seg_tokens_before"], seg_delta_b=whole.delta_b)
    ranks[0][1]["seg_prefix_z"] = torch.zeros(4, dtype=torch.float64)
    ranks[1][1]["seg_prefix_z"] = first.z_sum
    total, grad, mets = 0.0, torch.zeros_like(lp), []
    for idx, part in ranks:
        xp = lp[idx].clone().requires_grad_()
        lo, mp = _run(cfg, dict(part, logprobs=xp), counts)
        grad[idx] = torch.autograd.grad(lo, xp)[0]
        total = total + lo.detach()
        mets.append(mp)
    assert torch.allclose(total, loss.detach(), atol=1e-6, rtol=1e-5)
    assert torch.allclose(grad, g, atol=1e-7)
    merged = _merge(mets)
    for k in met:
        assert torch.allclose(torch.as_tensor(merged[k]), met[k], atol=1e-6, rtol=1e-5), k


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_and_empty_batches_give_zero_loss_and_finite_metrics(mode, agg):
    cfg = _cfg(mode, loss_agg_mode=agg, topk=2)
    gen = torch.Generator().manual_seed(1)
    for lengths, counts in [([3, 0, 4], GlobalCounts(0, 0, 8)), ([0, 0], GlobalCounts(0, 0, 8)),
                            ([], GlobalCounts(0, 0, 8)), ([3, 0, 4], GlobalCounts(10, 5, 8))]:
        data = random_batch(gen, lengths, v=6, k=2, mask_p=0.0)
        loss, met = compute_policy_loss(cfg, PolicyInputs(**data), counts)
        loss.backward()
        assert loss.item() == 0.0
        assert all(torch.isfinite(v).all() for v in met.values()), met
        assert data["logprobs"].grad is None or torch.all(data["logprobs"].grad == 0)


@pytest.mark.parametrize("mode", ["cppo", "gspo", "ppo"])
def test_an_empty_sequence_changes_nothing(mode):
    gen = torch.Generator().manual_seed(2)
    data = random_batch(gen, [5, 0, 7], v=6, k=2, requires_grad=False)
    cfg = _cfg(mode, loss_agg_mode="seq-mean-token-mean", topk=2, delta_b_mode="p90")
    counts = GlobalCounts(int(data["loss_mask"].sum()), 2, 8)
    with_empty, _ = compute_policy_loss(cfg, PolicyInputs(**data), counts)
    data["cu_seqlens"] = torch.tensor([0, 5, 12])
    without, _ = compute_policy_loss(cfg, PolicyInputs(**data), counts)
    assert torch.equal(with_empty, without) and torch.isfinite(with_empty)
