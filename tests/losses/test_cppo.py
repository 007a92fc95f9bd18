"""CPPO's segmented-scan mask (algorithms.md Sec. 4) against CPPO Alg. 1 written here as a per-token loop,
plus hand cases, the DPPO limit, packed == padded, context-parallel chunking, p90 and long-sequence numerics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.losses import (GlobalCounts, LossConfig, PolicyInputs, binary_tv, compute_policy_loss, cppo_mask,
                                segment_ids, segment_quantile)

from ._gen import random_batch

TIE = 1e-9   # fp64 loop vs fp64 scan: tokens this close to the threshold may round either way


def quantile90(xs):
    """torch.quantile's 'linear' rule, in plain Python."""
    xs = sorted(xs)
    pos = 0.9 * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def alg1(d, m, lengths, *, delta, w_min, horizon, max_len=None, delta_b_mode="fixed", delta_b=0.015,
         delta_b_min=0.02, cap_mult=2.0):
    """CPPO Alg. 1, one token at a time in Python floats. delta: a float or a per-token list.
    Returns per-token (inside, c, z) and per-sequence (delta_b, sum z)."""
    inside, cs, zs, dbs, zsums = [], [], [], [], []
    start = 0
    for length in lengths:
        idx = range(start, start + length)
        resp = [d[i] for i in idx if m[i]]
        big_t = len(resp) if horizon == "sequence" else max_len
        if delta_b_mode == "fixed":
            db = delta_b
        else:
            db = delta_b_min if not resp else min(max(quantile90(resp), delta_b_min), cap_mult * delta_b_min)
        s = w_sum = 0.0
        t = 0
        for i in idx:
            if not m[i]:                       # prompt / padding / tool tokens count nowhere
                inside.append(True), cs.append(math.nan), zs.append(0.0)
                continue
            t += 1
            w = 1 - (1 - w_min) * (t - 1) / max(big_t - 1, 1)          # Eq. 9
            z = w * d[i]
            dl = delta[i] if isinstance(delta, list) else delta
            c = min(dl, dl + db * w_sum - s)                               # Eq. 8
            inside.append(z <= c), cs.append(c), zs.append(z)
            s += z                                                          # every response token counts
            w_sum += w
        dbs.append(db), zsums.append(s)
        start += length
    return inside, cs, zs, dbs, zsums


def _agree(got_inside, ref_inside, ref_c, ref_z, tie=TIE):
    for i, (g, r) in enumerate(zip(got_inside, ref_inside)):
        if g != r:
            assert abs(ref_z[i] - ref_c[i]) < tie, f"token {i}: got {g}, Alg. 1 says {r}"


def test_hand_case_budget_rejects_the_fourth_token():
    # T = 4, w = (1, .9333, .8667, .8); D = (.1, .1, .02, .1); delta .15, delta_b .05
    # c_1 = .15; c_2 = min(.15, .15 + .05*1 - .1) = .1; c_3 = .15 + .05*1.9333 - .19333 = .05333;
    # c_4 = .15 + .05*2.8 - .21067 = .07933 < Z_4 = .08 <= delta  -> refused by the budget alone
    d = torch.tensor([0.1, 0.1, 0.02, 0.1])
    cm = cppo_mask(d, torch.ones(4), torch.tensor([0, 4]), delta=0.15, w_min=0.8, horizon="sequence",
                   delta_b=0.05)
    assert cm.inside.tolist() == [True, True, True, False]
    assert cm.budget_only.tolist() == [False, False, False, True]
    assert torch.allclose(cm.threshold, torch.tensor([0.15, 0.1, 0.0533333, 0.0793333], dtype=torch.float64),
                          atol=1e-6)
    # the same D under horizon 'max' with L = 8: flatter weights (1, .9714, .9429, .9143) -> Z_4 = .0914,
    # c_4 = .15 + .05 * 2.9143 - (.1 + .09714 + .01886) = .07943 -> still refused
    cm = cppo_mask(d, torch.ones(4), torch.tensor([0, 4]), delta=0.15, w_min=0.8, horizon="max",
                   max_response_length=8, delta_b=0.05)
    assert cm.inside.tolist() == [True, True, True, False]


def test_hand_case_masked_tokens_count_nowhere_and_sums_reset_per_segment():
    # two segments; a prompt token (m = 0) with a huge D in front of each: it must not enter S or W.
    # (dyadic values, so the hand arithmetic is exact)
    d = torch.tensor([9.0, 0.125, 0.125, 9.0, 0.125, 0.125])
    m = torch.tensor([0, 1, 1, 0, 1, 1])
    cm = cppo_mask(d, m, torch.tensor([0, 3, 6]), delta=0.25, w_min=1.0, horizon="sequence", delta_b=0.0625)
    # per segment: c_1 = .25, c_2 = .25 + .0625 * 1 - .125 = .1875 (had the prompt counted: S = 9.125, c < 0)
    assert cm.inside.tolist() == [True] * 6
    assert cm.threshold[[1, 2, 4, 5]].tolist() == [0.25, 0.1875, 0.25, 0.1875]
    assert cm.z_sum.tolist() == [0.25, 0.25]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6),
       mask_p=st.sampled_from([0.5, 0.9, 1.0]), horizon=st.sampled_from(["sequence", "max"]),
       delta_b_mode=st.sampled_from(["fixed", "p90"]), w_min=st.sampled_from([0.5, 0.8, 1.0]),
       per_sign=st.booleans())
def test_matches_alg1_loop(seed, lengths, mask_p, horizon, delta_b_mode, w_min, per_sign):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    d = torch.rand(n, generator=gen, dtype=torch.float64) * 0.12
    m = torch.rand(n, generator=gen) < mask_p
    adv = torch.randn(n, generator=gen)
    delta = [0.15 if a > 0 else 0.1 for a in adv.tolist()] if per_sign else 0.15
    delta_t = torch.tensor(delta, dtype=torch.float64) if per_sign else delta
    kw = dict(w_min=w_min, horizon=horizon, delta_b_mode=delta_b_mode, delta_b=0.02)
    cm = cppo_mask(d, m, torch.tensor([0] + lengths).cumsum(0), delta=delta_t, max_response_length=45, **kw)
    inside, c, z, dbs, zsums = alg1(d.tolist(), m.tolist(), lengths, delta=delta, max_len=45, **kw)
    _agree(cm.inside.tolist(), inside, c, z)
    mm = m.tolist()
    assert all(abs(a - b) < 1e-12 for a, b, k in zip(cm.threshold.tolist(), c, mm) if k)
    assert torch.allclose(cm.delta_b, torch.tensor(dbs, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(cm.z_sum, torch.tensor(zsums, dtype=torch.float64), atol=1e-12)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), horizon=st.sampled_from(["sequence", "max"]),
       delta_b_mode=st.sampled_from(["fixed", "p90"]), divergence=st.sampled_from(["binary_tv", "topk_kl"]))
def test_packed_and_padded_give_identical_masks_and_losses(seed, horizon, delta_b_mode, divergence):
    gen = torch.Generator().manual_seed(seed)
    b, big_l = 4, 24
    resp_lens = torch.randint(0, big_l + 1, (b,), generator=gen).tolist()
    prompt_lens = torch.randint(0, 5, (b,), generator=gen).tolist()
    # padded [B, L]: response left-aligned, padding after it; a few interior tool tokens masked
    pad = random_batch(gen, [big_l] * b, v=10, k=4, mask_p=1.0, spread=0.6, requires_grad=False)
    valid = torch.arange(big_l)[None, :] < torch.tensor(resp_lens)[:, None]
    tool = torch.rand(b, big_l, generator=gen) < 0.1
    pad["loss_mask"] = (valid & ~tool).reshape(-1)
    # packed THD: prompt tokens (m = 0, arbitrary values) + the response, no padding
    rows, pack = [], {}
    for i in range(b):
        rows += [("prompt", i)] * prompt_lens[i] + [("tok", i * big_l + j) for j in range(resp_lens[i])]
    for name, v in pad.items():
        if name == "cu_seqlens":
            continue
        pieces = [v[i * big_l:i * big_l + resp_lens[i]] for i in range(b)]
        filler = [v[:1].expand(prompt_lens[i], *v.shape[1:]) if v.shape[0] else v[:0] for i in range(b)]
        pack[name] = torch.cat([x for i in range(b) for x in (filler[i], pieces[i])])
    pack["loss_mask"] = torch.cat([torch.cat([torch.zeros(prompt_lens[i], dtype=torch.bool),
                                              pad["loss_mask"][i * big_l:i * big_l + resp_lens[i]]]) for i in range(b)])
    pack["cu_seqlens"] = torch.tensor([0] + [p + r for p, r in zip(prompt_lens, resp_lens)]).cumsum(0)
    pad_lp = pad.pop("logprobs").requires_grad_()
    pack_lp = pack.pop("logprobs").requires_grad_()
    cfg = LossConfig(mode="cppo", divergence=divergence, topk=4, horizon=horizon, delta_b_mode=delta_b_mode,
                     delta_b=0.02, loss_agg_mode="seq-mean-token-mean")
    counts = GlobalCounts(num_tokens=int(pad["loss_mask"].sum()), num_sequences=b, max_response_length=big_l)
    pad_inp = PolicyInputs(logprobs=pad_lp, **pad)
    pack_inp = PolicyInputs(logprobs=pack_lp, **pack)
    loss_pad, met_pad = compute_policy_loss(cfg, pad_inp, counts)
    loss_pack, met_pack = compute_policy_loss(cfg, pack_inp, counts)
    assert torch.allclose(loss_pad, loss_pack, atol=1e-7, rtol=1e-6)
    assert met_pad["masked_frac"] == met_pack["masked_frac"]
    # masks, token by token, from the standalone function on each layout
    from megatron_rl.losses import DIVERGENCES
    masks = []
    for inp in (pad_inp, pack_inp):
        dv = DIVERGENCES[divergence](inp, inp.rollout_logprobs).value
        masks.append(cppo_mask(dv, inp.loss_mask, inp.cu_seqlens, delta=0.15, horizon=horizon, max_response_length=big_l,
                               delta_b_mode=delta_b_mode, delta_b=0.02).inside)
    resp_pad = [i * big_l + j for i in range(b) for j in range(resp_lens[i])]
    resp_pack = [k for k, (kind, _) in enumerate(rows) if kind == "tok"]
    assert torch.equal(masks[0][resp_pad], masks[1][resp_pack])
    (g_pad,) = torch.autograd.grad(loss_pad, pad_lp)
    (g_pack,) = torch.autograd.grad(loss_pack, pack_lp)
    assert torch.allclose(g_pad[resp_pad], g_pack[resp_pack], atol=1e-7)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), horizon=st.sampled_from(["sequence", "max"]),
       divergence=st.sampled_from(["binary_tv", "binary_kl", "topk_tv", "topk_kl", "exact_tv", "exact_kl"]),
       form=st.sampled_from(["reinforce", "surrogate"]), split_delta=st.booleans())
def test_dppo_limit_is_exact(seed, horizon, divergence, form, split_delta):
    """w_min = 1 and delta_b = inf: CPPO equals DPPO with the same D and delta, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 30, (5,), generator=gen).tolist()
    data = random_batch(gen, lengths, v=12, k=5, spread=1.0, requires_grad=False)
    lp = data.pop("logprobs")
    deltas = dict(delta=0.1, delta_low=0.05) if split_delta else {}
    counts = GlobalCounts(num_tokens=int(data["loss_mask"].sum()), num_sequences=5, max_response_length=30)
    out = []
    for cfg in (LossConfig(mode=f"dppo_{divergence}", topk=5, loss_form=form, **deltas),
                LossConfig(mode="cppo", divergence=divergence, topk=5, w_min=1.0, delta_b=math.inf, horizon=horizon,
                           loss_form=form, **deltas)):
        x = lp.clone().requires_grad_()
        loss, met = compute_policy_loss(cfg, PolicyInputs(logprobs=x, **data), counts)
        out.append((loss, torch.autograd.grad(loss, x)[0], met["masked_frac"]))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])
    assert torch.equal(out[0][2], out[1][2])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), horizon=st.sampled_from(["sequence", "max"]),
       delta_b_mode=st.sampled_from(["fixed", "p90"]))
def test_context_parallel_chunks_with_carries_match_whole_sequences(seed, horizon, delta_b_mode):
    """A sequence cut into chunks (segments) with the per-segment carries a CP caller supplies gets exactly
    the whole sequence's mask; the carries are computed here from Alg. 1."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (3,), generator=gen).tolist()
    n = sum(lengths)
    d = torch.rand(n, generator=gen, dtype=torch.float64) * 0.12
    m = torch.rand(n, generator=gen) < 0.85
    kw = dict(w_min=0.8, horizon=horizon, delta_b_mode=delta_b_mode, delta_b=0.02)
    inside, c, z, dbs, _ = alg1(d.tolist(), m.tolist(), lengths, delta=0.15, max_len=40, **kw)
    # cut every sequence at up to two random points -> chunk segments with carries
    chunk_cu, num_tokens, before, prefix_z, seg_db = [0], [], [], [], []
    start = 0
    for s_i, length in enumerate(lengths):
        cuts = sorted(set(torch.randint(0, length + 1, (2,), generator=gen).tolist()) | {0, length})
        seq_m = m[start:start + length].tolist()
        for a, b in zip(cuts[:-1], cuts[1:]):
            chunk_cu.append(start + b)
            num_tokens.append(sum(seq_m))
            before.append(sum(seq_m[:a]))
            prefix_z.append(sum(z[start:start + a]))
            seg_db.append(dbs[s_i])
        start += length
    cm = cppo_mask(d, m, torch.tensor(chunk_cu), delta=0.15, max_response_length=40,
                   seg_num_tokens=torch.tensor(num_tokens), seg_tokens_before=torch.tensor(before),
                   seg_prefix_z=torch.tensor(prefix_z, dtype=torch.float64), seg_delta_b=torch.tensor(seg_db), **kw)
    _agree(cm.inside.tolist(), inside, c, z)
    # each chunk's z_sum is its share of the scan a CP caller exchanges
    zs = torch.tensor(z, dtype=torch.float64)
    ref = torch.stack([zs[a:b].sum() for a, b in zip(chunk_cu[:-1], chunk_cu[1:])])
    assert torch.allclose(cm.z_sum, ref, atol=1e-12)


def test_p90_quantile_matches_torch_quantile_per_segment():
    gen = torch.Generator().manual_seed(3)
    lengths = [0, 1, 2, 7, 100, 3000]
    n = sum(lengths)
    v = torch.rand(n, generator=gen).to(torch.bfloat16)          # bf16: torch.quantile would refuse it
    m = torch.rand(n, generator=gen) < 0.8
    seg = segment_ids(torch.tensor([0] + lengths).cumsum(0), n)
    got = segment_quantile(v, m, seg, len(lengths), 0.9)
    start = 0
    for i, length in enumerate(lengths):
        x = v[start:start + length][m[start:start + length]].double()
        if x.numel() == 0:
            assert math.isnan(got[i])
        else:
            assert got[i].item() == pytest.approx(torch.quantile(x, 0.9).item(), abs=1e-12)
        start += length
    # padded layout (equal-length segments: the row-wise path), against torch.quantile + the Eq. 22 clamp
    b, big_l = 5, 200
    v2 = torch.rand(b * big_l, generator=gen) * 0.035       # p90 ~ .0315: inside the clamp [.02, .04]
    m2 = torch.rand(b * big_l, generator=gen) < torch.tensor([0.0, 0.3, 0.9, 1.0, 0.005]).repeat_interleave(big_l)
    cm = cppo_mask(v2, m2, torch.arange(0, b * big_l + 1, big_l), delta=0.15, horizon="sequence",
                   delta_b_mode="p90", delta_b_min=0.02, cap_mult=2.0)
    for i in range(b):
        x = v2[i * big_l:(i + 1) * big_l][m2[i * big_l:(i + 1) * big_l]].double()
        ref = 0.02 if x.numel() == 0 else min(max(torch.quantile(x, 0.9).item(), 0.02), 0.04)
        assert cm.delta_b[i].item() == pytest.approx(ref, abs=1e-12)
    # Eq. 22 clamp and the empty-sequence fallback, through the mask
    cm = cppo_mask(v, m, torch.tensor([0] + lengths).cumsum(0), delta=0.15, horizon="sequence", delta_b_mode="p90",
                   delta_b_min=0.02, cap_mult=2.0)
    assert cm.delta_b[0].item() == 0.02                        # empty -> delta_b_min
    assert torch.all((cm.delta_b >= 0.02) & (cm.delta_b <= 0.04))
    assert cm.delta_b[-1].item() == 0.04                       # uniform(0,1) p90 ~ .9 -> capped at 2 * .02


def test_long_bf16_response_prefix_sums_match_fp64():
    """16k-token response, bf16 log-probs: the scan's thresholds c_t (which carry S_{t-1}) match an fp64
    reference to 1e-6 absolute, and the masks agree except at near-ties."""
    gen = torch.Generator().manual_seed(0)
    n = 16384
    p_mu = torch.rand(n, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    p_pi = (p_mu + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64)).clamp(0.005, 0.995)
    lp_mu, lp_pi = p_mu.log().to(torch.bfloat16), p_pi.log().to(torch.bfloat16)
    m = torch.ones(n, dtype=torch.bool)
    cu = torch.tensor([0, n])
    d32 = binary_tv(lp_pi, lp_mu)                              # the library path: fp32 from bf16
    cm = cppo_mask(d32, m, cu, delta=0.15, w_min=0.8, horizon="sequence", delta_b=0.04)
    # fp64 reference on the same bf16 inputs: per-token loop of Alg. 1
    d64 = (lp_pi.double().exp() - lp_mu.double().exp()).abs().tolist()
    inside, c, z, _, _ = alg1(d64, [True] * n, [n], delta=0.15, w_min=0.8, horizon="sequence", delta_b=0.04)
    err = (cm.threshold - torch.tensor(c, dtype=torch.float64)).abs().max().item()
    assert err < 1e-6, err
    _agree(cm.inside.tolist(), inside, c, z, tie=1e-6)
    assert 0 < sum(inside) < n                                 # the budget binds somewhere: a real test
    # what the spec warns about: the same prefix sum accumulated in bf16 is far off
    w = 1 - 0.2 * torch.arange(n, dtype=torch.float64) / (n - 1)
    s64 = torch.cumsum(w * torch.tensor(d64, dtype=torch.float64), 0)
    s16 = torch.cumsum((w * torch.tensor(d64, dtype=torch.float64)).to(torch.bfloat16), 0)
    assert (s16.double() - s64).abs().max() > 1.0


def test_empty_segments_and_empty_batch():
    cm = cppo_mask(torch.zeros(0), torch.zeros(0), torch.tensor([0, 0, 0]), delta=0.15, horizon="sequence",
                   delta_b_mode="p90")
    assert cm.inside.numel() == 0 and cm.delta_b.tolist() == [0.02, 0.02] and cm.z_sum.tolist() == [0.0, 0.0]
    cm = cppo_mask(torch.tensor([0.5, 0.5]), torch.tensor([0, 0]), torch.tensor([0, 0, 2]), delta=0.15,
                   horizon="max", max_response_length=4)
    assert cm.inside.tolist() == [True, True] and not cm.budget_only.any()


def test_position_beyond_horizon_raises():
    with pytest.raises(ValueError, match="max_response_length"):
        cppo_mask(torch.zeros(5), torch.ones(5), torch.tensor([0, 5]), delta=0.15, horizon="max", max_response_length=4)
    with pytest.raises(ValueError, match="max_response_length"):
        cppo_mask(torch.zeros(5), torch.ones(5), torch.tensor([0, 5]), delta=0.15, horizon="max")
