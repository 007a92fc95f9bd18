"""Every loss mode by hand (small tensors, masks checked by eye), the direction rule, and the gradient
identities of algorithms.md Sec. 2, against references written here.

Reading M_t from the gradient: with token-mean over N loss tokens, the REINFORCE form's gradient is
d loss / d logprobs_t = -A_t * min(r_t, C) * M_t * (correction_t) / N, so M_t = 0 exactly where it is 0.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.losses import GlobalCounts, LossConfig, PolicyInputs, compute_policy_loss

from ._gen import random_batch

L = math.log


def run(cfg, lp, anchor, adv, **extra):
    """Loss, gradient wrt logprobs and metrics; anchor given as rollout log-probs unless cfg.anchor == 'old'."""
    x = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    n = x.shape[0]
    kw = dict(rollout_logprobs=torch.tensor(anchor, dtype=torch.float32), advantages=torch.tensor(adv, dtype=torch.float32),
              loss_mask=torch.ones(n, dtype=torch.bool))
    kw.update(extra)
    inp = PolicyInputs(logprobs=x, **kw)
    counts = GlobalCounts(num_tokens=n, num_sequences=inp.num_segments, max_response_length=max(n, 1))
    loss, met = compute_policy_loss(cfg, inp, counts)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g, met


def keep_of(g):
    return [int(v != 0) for v in g.tolist()]


TOKEN = dict(loss_agg_mode="token-mean")


def test_ppo_hand():
    r = [0.7, 0.9, 1.1, 1.3]
    lp = [L(0.5 * x) for x in r] * 2
    adv = [1.0] * 4 + [-1.0] * 4
    loss, g, met = run(LossConfig(mode="ppo", **TOKEN), lp, [L(0.5)] * 8, adv)
    # A > 0: keep r <= 1.28 and r = .7 (moving back up toward the anchor); A < 0: keep r >= .8 and r = 1.3
    assert keep_of(g) == [1, 1, 1, 0] + [0, 1, 1, 1]
    expected = [-a * x * k / 8 for a, x, k in zip(adv, r * 2, keep_of(g))]
    assert torch.allclose(g, torch.tensor(expected), atol=1e-6)
    assert met["masked_frac"].item() == pytest.approx(2 / 8)
    assert met["masked_frac_adv_pos"].item() == pytest.approx(1 / 8)
    assert met["masked_frac_adv_neg"].item() == pytest.approx(1 / 8)
    assert met["ratio_max"].item() == pytest.approx(1.3, rel=1e-5)


def test_dual_clip_hand():
    r = [2.0, 3.5, 3.5]
    _, g, met = run(LossConfig(mode="dual_clip", clip_ratio_c=3.0, **TOKEN), [L(0.1 * x) for x in r], [L(0.1)] * 3,
                    [-1.0, -1.0, 1.0])
    # A < 0: r = 2 kept (toward), r = 3.5 > c dropped (dual clip); A > 0 with r = 3.5: clipped as in ppo
    assert keep_of(g) == [1, 0, 0]
    assert met["dual_clip_frac"].item() == pytest.approx(1 / 3)


def test_dppo_binary_tv_hand():
    pi = [0.3, 0.6, 0.7, 0.9]                        # mu = .5: D = .2 .1 .2 .4, delta = .15
    _, g, met = run(LossConfig(mode="dppo_binary_tv", **TOKEN), [L(p) for p in pi] * 2, [L(0.5)] * 8,
                    [1.0] * 4 + [-1.0] * 4)
    assert keep_of(g) == [1, 1, 0, 0] + [0, 1, 1, 1]
    assert met["divergence_max"].item() == pytest.approx(0.4, abs=1e-6)
    assert met["divergence_mean"].item() == pytest.approx((0.2 + 0.1 + 0.2 + 0.4) / 4, abs=1e-6)


def test_dppo_binary_kl_hand():
    pi = [0.2, 0.6, 0.7, 0.9]

    def kl(m, p):
        return m * L(m / p) + (1 - m) * L((1 - m) / (1 - p))
    ds = [kl(0.5, p) for p in pi]                    # .223 .0204 .0872 .368 vs delta .05
    assert [d <= 0.05 for d in ds] == [False, True, False, False]
    _, g, met = run(LossConfig(mode="dppo_binary_kl", **TOKEN), [L(p) for p in pi] * 2, [L(0.5)] * 8,
                    [1.0] * 4 + [-1.0] * 4)
    assert keep_of(g) == [1, 1, 0, 0] + [0, 1, 1, 1]
    assert met["divergence_mean"].item() == pytest.approx(sum(ds) / 4, abs=1e-6)


# vocabulary of 4; mu = (.5 .3 .15 .05); top-1 id 0; sampled token 1 -> buckets {0, 1, other}
MU = [0.5, 0.3, 0.15, 0.05]
PI = [[0.45, 0.35, 0.15, 0.05],   # TV .05, KL .0064: inside
      [0.2, 0.4, 0.3, 0.1],       # TV .3,  KL .233: outside, pi_a up (r > 1)
      [0.6, 0.25, 0.1, 0.05],     # TV .1,  KL .021: inside (and r < 1)
      [0.1, 0.32, 0.5, 0.08]]     # binary TV only .02, but top-K TV .4: outside, r > 1


def _topk_extra():
    pi = torch.tensor(PI).log()
    mu = torch.tensor([MU] * 4).log()
    ids = torch.zeros(4, 1, dtype=torch.long)
    return dict(tokens=torch.ones(4, dtype=torch.long), topk_ids=ids, anchor_topk_logprobs=mu.gather(1, ids),
                topk_logprobs=pi.gather(1, ids), full_logprobs=pi, anchor_full_logprobs=mu)


@pytest.mark.parametrize("mode", ["dppo_topk_tv", "dppo_topk_kl", "dppo_exact_tv", "dppo_exact_kl"])
def test_dppo_topk_and_exact_hand(mode):
    lp = [L(row[1]) for row in PI]
    _, g, met = run(LossConfig(mode=mode, topk=1, **TOKEN), lp, [L(0.3)] * 4, [1.0] * 4, **_topk_extra())
    assert keep_of(g) == [1, 0, 1, 0]
    _, g, _ = run(LossConfig(mode=mode, topk=1, **TOKEN), lp, [L(0.3)] * 4, [-1.0] * 4, **_topk_extra())
    assert keep_of(g) == [1, 1, 1, 1]                # r > 1 with A < 0 is toward; token 3 is inside
    # binary TV keeps tokens 2 and 4 (|pi_a - mu_a| = .1 and .02): it cannot see mass moving between
    # other tokens, which top-K / exact do
    _, g, _ = run(LossConfig(mode="dppo_binary_tv", **TOKEN), lp, [L(0.3)] * 4, [1.0] * 4)
    assert keep_of(g) == [1, 1, 1, 1]
    if mode.startswith("dppo_topk"):
        assert met["topk_tail_mass_mean"].item() == pytest.approx(0.2, abs=1e-6)   # mu's "other" bucket
        expected_tv = [0.05, 0.3, 0.1, 0.4]
        if mode == "dppo_topk_tv":
            assert met["divergence_mean"].item() == pytest.approx(sum(expected_tv) / 4, abs=1e-6)


def test_cppo_hand():
    # mu = .5, pi = .5 + D with D = (.1 .1 .02 .1); A > 0 so every token moves away: the 4th is refused by the
    # prefix budget (c_4 = .0793 < Z_4 = .08, see test_cppo.py's hand case)
    d = [0.1, 0.1, 0.02, 0.1]
    cfg = LossConfig(mode="cppo", horizon="sequence", delta_b=0.05, w_min=0.8, **TOKEN)
    lp = [L(0.5 + x) for x in d]
    _, g, met = run(cfg, lp, [L(0.5)] * 4, [1.0] * 4)
    assert keep_of(g) == [1, 1, 1, 0]
    assert met["cppo_budget_only_frac"].item() == pytest.approx(0.25)
    assert met["cppo_delta_b_mean"].item() == pytest.approx(0.05)
    _, g, met = run(cfg, lp, [L(0.5)] * 4, [-1.0] * 4)
    assert keep_of(g) == [1, 1, 1, 1]               # toward the anchor: never masked
    assert met["cppo_budget_only_frac"].item() == 0.0
    # the same tokens under DPPO: all within delta = .15
    _, g, _ = run(LossConfig(mode="dppo_binary_tv", **TOKEN), lp, [L(0.5)] * 4, [1.0] * 4)
    assert keep_of(g) == [1, 1, 1, 1]


def test_gspo_hand():
    # three sequences of two tokens: log-ratios (+1e-4, -1e-4) -> s = 1 inside; (.1, .2) -> s = e^.15 outside
    lr = [1e-4, -1e-4, 0.1, 0.2, 0.1, 0.2]
    adv = [1.0, 1.0, 1.0, 1.0, -1.0, -1.0]
    cfg = LossConfig(mode="gspo", **TOKEN)
    _, g, met = run(cfg, [L(0.4) + x for x in lr], [L(0.4)] * 6, adv, cu_seqlens=torch.tensor([0, 2, 4, 6]))
    assert keep_of(g) == [1, 1, 0, 0, 1, 1]         # the whole 2nd sequence is dropped; the 3rd moves back
    s = math.exp(0.15)
    assert torch.allclose(g, torch.tensor([-1 / 6, -1 / 6, 0, 0, s / 6, s / 6]), atol=1e-6)


def test_cispo_and_pg_is_hand():
    r = [0.5, 2.0, 3.0]
    lp = [L(0.2 * x) for x in r]
    _, g, met = run(LossConfig(mode="cispo", tis_cap=1.5, **TOKEN), lp, [L(0.2)] * 3, [1.0] * 3)
    assert torch.allclose(g, -torch.tensor([0.5, 1.5, 1.5]) / 3, atol=1e-6)   # no mask, weight min(r, C)
    assert met["ratio_above_cap_frac"].item() == pytest.approx(2 / 3)
    _, g, _ = run(LossConfig(mode="pg_is", **TOKEN), lp, [L(0.2)] * 3, [1.0] * 3)
    assert torch.allclose(g, -torch.tensor(r) / 3, atol=1e-6)


def test_tis_and_icepop_corrections_hand():
    mu = [L(0.1)] * 3
    old = [L(0.3), L(0.05), L(0.6)]                 # k = pi_old / mu = 3, .5, 6
    lp = old                                        # pi = pi_old: ratio 1, everything inside
    cfg = LossConfig(mode="dppo_binary_tv", anchor="old", rollout_correction="tis", rollout_is_cap=2.0, **TOKEN)
    _, g, met = run(cfg, lp, mu, [1.0] * 3, old_logprobs=torch.tensor(old))
    assert torch.allclose(g, -torch.tensor([2.0, 0.5, 2.0]) / 3, atol=1e-6)
    assert met["rollout_is_truncated_frac"].item() == pytest.approx(2 / 3)
    assert met["rollout_is_max"].item() == pytest.approx(6.0, rel=1e-5)
    old = [L(0.03), L(0.15), L(0.6)]                # k = .3, 1.5, 6 -> IcePop keeps only [.5, 5]
    cfg = LossConfig(mode="dppo_binary_tv", anchor="old", rollout_correction="icepop", **TOKEN)
    _, g, met = run(cfg, old, mu, [1.0] * 3, old_logprobs=torch.tensor(old))
    assert torch.allclose(g, -torch.tensor([0.0, 1.5, 0.0]) / 3, atol=1e-6)
    assert met["icepop_masked_frac"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_to_reference_hand(est):
    lp, ref = [L(0.5), L(0.2)], [L(0.25), L(0.4)]
    d = [a - b for a, b in zip(lp, ref)]            # log(pi / ref)
    value = {"k1": d, "k2": [0.5 * x * x for x in d], "k3": [math.exp(-x) - 1 + x for x in d]}[est]
    slope = {"k1": [1.0, 1.0], "k2": d, "k3": [1 - math.exp(-x) for x in d]}[est]
    cfg = LossConfig(mode="pg_is", kl_coef=0.1, kl_estimator=est, **TOKEN)
    loss, g, met = run(cfg, lp, lp, [0.0, 0.0], ref_logprobs=torch.tensor(ref))     # A = 0: only the KL term
    assert loss.item() == pytest.approx(0.1 * sum(value) / 2, abs=1e-6)
    assert met["kl_ref"].item() == pytest.approx(sum(value) / 2, abs=1e-6)
    assert torch.allclose(g, 0.1 * torch.tensor(slope) / 2, atol=1e-6)


def test_entropy_bonus_hand():
    ent = torch.tensor([1.0, 3.0], requires_grad=True)
    cfg = LossConfig(mode="pg_is", entropy_coef=0.01, **TOKEN)
    x = torch.tensor([L(0.5), L(0.5)], requires_grad=True)
    inp = PolicyInputs(logprobs=x, rollout_logprobs=x.detach().clone(), advantages=torch.zeros(2),
                       loss_mask=torch.ones(2), entropy=ent)
    loss, met = compute_policy_loss(cfg, inp, GlobalCounts(2, 1))
    assert loss.item() == pytest.approx(-0.01 * 2.0)
    assert met["entropy"].item() == pytest.approx(2.0)
    (ge,) = torch.autograd.grad(loss, ent)
    assert torch.allclose(ge, torch.full((2,), -0.01 / 2))


def test_anchor_old_measures_the_trust_region_against_pi_old():
    # pi = .6; mu = .5 (D = .1, inside) but pi_old = .3 (D = .3, outside): the anchor decides
    lp, mu, old = [L(0.6)], [L(0.5)], torch.tensor([L(0.3)])
    _, g, _ = run(LossConfig(mode="dppo_binary_tv", **TOKEN), lp, mu, [1.0], old_logprobs=old)
    assert keep_of(g) == [1]
    _, g, met = run(LossConfig(mode="dppo_binary_tv", anchor="old", **TOKEN), lp, mu, [1.0], old_logprobs=old)
    assert keep_of(g) == [0]
    assert met["divergence_max"].item() == pytest.approx(0.3, abs=1e-6)
    assert met["mismatch_tv_max"].item() == pytest.approx(0.1, abs=1e-6)     # always against mu


def test_bf16_logprobs_flow_through_with_fp32_math():
    gen = torch.Generator().manual_seed(5)
    data = random_batch(gen, [7, 9], v=6, k=2, requires_grad=False)
    x = data.pop("logprobs").to(torch.bfloat16).requires_grad_()
    loss, met = compute_policy_loss(LossConfig(mode="cppo", divergence="topk_tv", topk=2), PolicyInputs(logprobs=x, **data),
                                    GlobalCounts(int(data["loss_mask"].sum()), 2, 9))
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all() and all(torch.isfinite(v) for v in met.values())


# ---- properties ------------------------------------------------------------------------------------------

TOKEN_LEVEL_MODES = ["ppo", "dppo_binary_tv", "dppo_binary_kl", "dppo_topk_tv", "dppo_topk_kl", "dppo_exact_tv",
                     "dppo_exact_kl", "cppo", "pg_is", "cispo"]


def _random(seed, spread=1.0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or torch.randint(0, 25, (4,), generator=gen).tolist()
    data = random_batch(gen, lengths, v=10, k=3, spread=spread)
    n = sum(lengths)
    counts = GlobalCounts(num_tokens=int(data["loss_mask"].sum()), num_sequences=len(lengths), max_response_length=25)
    return data, counts, n


def _cfg(mode, **kw):
    extra = dict(tis_cap=4.0) if mode == "cispo" else {}
    if mode == "cppo":
        extra.update(delta_b=0.005, divergence="topk_tv")     # a tight budget: many budget-only refusals
    extra.update(kw)
    return LossConfig(mode=mode, topk=3, **extra)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(TOKEN_LEVEL_MODES), spread=st.floats(0.05, 2.0),
       form=st.sampled_from(["reinforce", "surrogate"]))
def test_direction_rule_token_moving_back_is_never_masked(seed, mode, spread, form):
    data, counts, n = _random(seed, spread)
    cfg = _cfg(mode, loss_form="reinforce" if mode == "cispo" else form)   # cispo is REINFORCE-only
    loss, met = compute_policy_loss(cfg, PolicyInputs(**data), counts)
    (g,) = torch.autograd.grad(loss, data["logprobs"])
    lr = data["logprobs"].detach() - data["rollout_logprobs"]
    adv, m = data["advantages"], data["loss_mask"]
    toward = m & (adv != 0) & (adv * lr <= 0)
    assert torch.all(g[toward] != 0)
    # and every masked loss token moves away from the anchor
    masked = m & (adv != 0) & (g == 0)
    assert torch.all(adv[masked] * lr[masked] > 0)


def _ppo_reference(lp, la, adv, m, counts, eps_low=0.2, eps_high=0.28, dual_c=None):
    r = torch.exp(lp - la)
    obj = torch.minimum(r * adv, r.clamp(1 - eps_low, 1 + eps_high) * adv)
    if dual_c is not None:
        obj = torch.where(adv < 0, torch.maximum(obj, dual_c * adv), obj)
    return -(obj * m).sum() / counts.num_tokens


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.05, 1.5), form=st.sampled_from(["reinforce", "surrogate"]),
       dual=st.booleans())
def test_ppo_gradient_equals_autograd_of_min_clip(seed, spread, form, dual):
    data, counts, n = _random(seed, spread)
    cfg = LossConfig(mode="dual_clip" if dual else "ppo", loss_form=form, loss_agg_mode="token-mean")
    loss, _ = compute_policy_loss(cfg, PolicyInputs(**data), counts)
    (g,) = torch.autograd.grad(loss, data["logprobs"])
    x = data["logprobs"].detach().double().requires_grad_()
    ref = _ppo_reference(x, data["rollout_logprobs"].double(), data["advantages"].double(), data["loss_mask"].double(),
                         counts, dual_c=3.0 if dual else None)
    (g_ref,) = torch.autograd.grad(ref, x)
    assert torch.allclose(g.double(), g_ref, atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(TOKEN_LEVEL_MODES + ["gspo", "dual_clip"]),
       agg=st.sampled_from(["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
       spread=st.floats(0.05, 1.5))
def test_reinforce_and_surrogate_have_the_same_gradient_below_the_cap(seed, mode, agg, spread):
    data, counts, n = _random(seed, spread)
    lr = (data["logprobs"].detach() - data["rollout_logprobs"]).exp()
    cap = float(lr.max()) * 1.5 + 5.0 if n else 5.0           # r < C everywhere (cispo needs a finite C)
    grads = []
    for form in ("reinforce", "surrogate"):
        if mode == "cispo" and form == "surrogate":
            cfg = _cfg("pg_is", loss_form=form, tis_cap=cap, loss_agg_mode=agg)   # cispo == pg_is while r < C
        else:
            cfg = _cfg(mode, loss_form=form, tis_cap=cap, loss_agg_mode=agg)
        loss, _ = compute_policy_loss(cfg, PolicyInputs(**data), counts)
        grads.append(torch.autograd.grad(loss, data["logprobs"])[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_above_the_cap_the_two_forms_differ_as_documented():
    r = [3.0]
    lp, mu = [L(0.3)], [L(0.1)]
    _, g_re, _ = run(LossConfig(mode="pg_is", tis_cap=2.0, **TOKEN), lp, mu, [1.0])
    _, g_su, _ = run(LossConfig(mode="pg_is", tis_cap=2.0, loss_form="surrogate", **TOKEN), lp, mu, [1.0])
    assert g_re.item() == pytest.approx(-2.0) and g_su.item() == 0.0     # C * grad log pi vs truncated
    assert r[0] > 2.0


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0005, 0.05))
def test_gspo_gradient_equals_autograd_of_the_paper_objective(seed, spread):
    data, counts, n = _random(seed, spread)
    cfg = LossConfig(mode="gspo", loss_form="surrogate", loss_agg_mode="seq-mean-token-mean")
    loss, _ = compute_policy_loss(cfg, PolicyInputs(**data), counts)
    (g,) = torch.autograd.grad(loss, data["logprobs"])
    # GSPO-token (Zheng et al. 2025, Eq. 13-14), written per sequence
    x = data["logprobs"].detach().double().requires_grad_()
    la, adv, m, cu = (data["rollout_logprobs"].double(), data["advantages"].double(), data["loss_mask"],
                      data["cu_seqlens"].tolist())
    total = 0.0
    for a, b in zip(cu[:-1], cu[1:]):
        mm = m[a:b]
        if mm.sum() == 0:
            continue
        s = torch.exp(((x[a:b] - la[a:b])[mm]).mean()).detach()
        s_tok = s * torch.exp(x[a:b] - x[a:b].detach())
        obj = torch.minimum(s_tok * adv[a:b], s_tok.clamp(1 - 3e-4, 1 + 4e-4) * adv[a:b])
        total = total - obj[mm].sum() / mm.sum()
    total = total / counts.num_sequences
    (g_ref,) = torch.autograd.grad(total, x)
    assert torch.allclose(g.double(), g_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", sorted(set(TOKEN_LEVEL_MODES + ["gspo", "dual_clip"])))
def test_callers_tensors_are_not_mutated(mode):
    data, counts, _ = _random(7, 1.0, lengths=[5, 0, 9])
    data["ref_logprobs"] = data["rollout_logprobs"] - 0.1
    data["entropy"] = torch.rand(14)
    before = {k: v.detach().clone() for k, v in data.items() if isinstance(v, torch.Tensor)}
    loss, _ = compute_policy_loss(_cfg(mode, kl_coef=0.1, entropy_coef=0.01), PolicyInputs(**data), counts)
    loss.backward()
    for k, v in before.items():
        assert torch.equal(data[k].detach(), v), k
