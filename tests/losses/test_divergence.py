"""Divergences (algorithms.md Sec. 3): hand cases, the binary <= top-K <= exact ordering, K = V equals exact,
binary-KL numerics at extreme probabilities. References are written here in fp64 / plain Python."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.losses import DIVERGENCES, PolicyInputs, binary_kl, binary_tv, exact_kl, exact_tv, topk_buckets

from ._gen import random_dists

L = math.log


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def _ref_topk(mu, pi, ids, token):
    """Plain-Python top-K buckets: the set ids u {token} (deduplicated) + "other"; returns (TV, KL)."""
    chosen = list(dict.fromkeys(list(ids) + [token]))
    a = [mu[i] for i in chosen] + [max(1 - sum(mu[i] for i in chosen), 0.0)]
    p = [pi[i] for i in chosen] + [max(1 - sum(pi[i] for i in chosen), 0.0)]
    tv = 0.5 * sum(abs(x - y) for x, y in zip(a, p))
    kl = sum(x * L(x / y) for x, y in zip(a, p) if x > 0)
    return tv, kl


def bucket_tv(a, p):
    """Reference on bucket probabilities [N, B], fp64."""
    return 0.5 * (a.double() - p.double()).abs().sum(-1)


def bucket_kl(a, p):
    a, p = a.double(), p.double()
    return torch.where(a > 0, a * (a.log() - p.log()), 0.0).sum(-1)


def _topk_div(name, ids, tokens, mu, pi):
    """The library's top-K divergence (the registry path the loss uses) for full tables mu, pi [N, V]."""
    pick = lambda t, i: t.gather(1, i).float()
    inp = PolicyInputs(logprobs=pick(pi, tokens[:, None])[:, 0], rollout_logprobs=pick(mu, tokens[:, None])[:, 0],
                       advantages=torch.zeros(len(tokens)), loss_mask=torch.ones(len(tokens)), tokens=tokens,
                       topk_ids=ids, anchor_topk_logprobs=pick(mu, ids), topk_logprobs=pick(pi, ids))
    return DIVERGENCES[name](inp, inp.rollout_logprobs).value


def _topk_row(mu, pi, ids, token):
    mu_l, pi_l = torch.tensor(mu).log(), torch.tensor(pi).log()
    ids_t = torch.tensor([ids])
    return topk_buckets(ids_t, torch.tensor([token]), mu_l[ids_t].float(), mu_l[[token]].float(),
                        pi_l[ids_t].float(), pi_l[[token]].float())


def test_binary_hand_cases():
    # mu_a = 0.5, pi_a = 0.7 -> TV 0.2 ; mu_a = 0.5, pi_a = 0.25 -> KL = .5 ln(.5/.25) + .5 ln(.5/.75)
    assert binary_tv(_t([L(0.7)]), _t([L(0.5)])).item() == pytest.approx(0.2, abs=1e-6)
    assert binary_kl(_t([L(0.25)]), _t([L(0.5)])).item() == pytest.approx(0.5 * L(2) + 0.5 * L(0.5 / 0.75), abs=1e-6)
    assert binary_kl(_t([L(0.3)]), _t([L(0.3)])).item() == pytest.approx(0.0, abs=1e-7)   # no change, no D


def test_topk_hand_cases():
    mu = [0.4, 0.3, 0.2, 0.06, 0.04]
    pi = [0.3, 0.3, 0.25, 0.1, 0.05]
    # K = 2 ids {0, 1}, sampled 3 -> buckets {0, 1, 3, other}: mu (.4 .3 .06 .24), pi (.3 .3 .1 .3)
    a, p = _topk_row(mu, pi, [0, 1], 3)
    assert torch.allclose(a, _t([[0.4, 0.3, 0.06, 0.24]]), atol=1e-6)
    assert torch.allclose(p, _t([[0.3, 0.3, 0.1, 0.3]]), atol=1e-6)
    assert bucket_tv(a, p).item() == pytest.approx(0.5 * (0.1 + 0 + 0.04 + 0.06), abs=1e-6)
    assert bucket_kl(a, p).item() == pytest.approx(_ref_topk(mu, pi, [0, 1], 3)[1], abs=1e-6)
    # sampled token already among the top-K: counted once, its extra column is empty
    a, p = _topk_row(mu, pi, [0, 1], 1)
    assert torch.allclose(a, _t([[0.4, 0.3, 0.0, 0.3]]), atol=1e-6)
    assert bucket_tv(a, p).item() == pytest.approx(_ref_topk(mu, pi, [0, 1], 1)[0], abs=1e-6)
    assert bucket_kl(a, p).item() == pytest.approx(_ref_topk(mu, pi, [0, 1], 1)[1], abs=1e-6)
    # top-K not sorted, K = 3, sampled token last in the vocabulary
    a, p = _topk_row(mu, pi, [2, 0, 3], 4)
    tv, kl = _ref_topk(mu, pi, [2, 0, 3], 4)
    assert bucket_tv(a, p).item() == pytest.approx(tv, abs=1e-6)
    assert bucket_kl(a, p).item() == pytest.approx(kl, abs=1e-6)


def test_topk_tail_keeps_relative_precision():
    # a peaked distribution: top-1 = 1 - 3e-6; the sampled token (1e-6) joins; the tail is 2e-6.
    # 1 - (sum close to 1) in fp32 would be off by ~1e-7 (5%); the expm1 form keeps it to ~1e-6 relative
    lp0 = math.log1p(-3e-6)
    a, _ = topk_buckets(torch.tensor([[0]]), torch.tensor([1]), _t([[lp0]]), _t([L(1e-6)]), _t([[lp0]]),
                        _t([L(1e-6)]))
    assert a[0, 2].item() == pytest.approx(2e-6, rel=1e-4)


def test_exact_hand_case():
    mu, pi = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
    ml, pl = torch.tensor([mu]).log(), torch.tensor([pi]).log()
    assert exact_tv(pl, ml).item() == pytest.approx(0.25, abs=1e-6)
    assert exact_kl(pl, ml).item() == pytest.approx(0.5 * L(2) + 0.25 * L(0.5), abs=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 12), k=st.integers(1, 12), spread=st.floats(0.01, 3.0))
def test_binary_le_topk_le_exact(seed, v, k, spread):
    k = min(k, v)
    gen = torch.Generator().manual_seed(seed)
    n = 16
    mu, pi = random_dists(gen, n, v, spread)
    tokens = torch.multinomial(mu.exp(), 1, generator=gen).squeeze(1)
    ids = mu.topk(k, dim=-1).indices
    lp, la = pi.gather(1, tokens[:, None])[:, 0].float(), mu.gather(1, tokens[:, None])[:, 0].float()
    top_tv, top_kl = _topk_div("topk_tv", ids, tokens, mu, pi).double(), _topk_div("topk_kl", ids, tokens, mu, pi).double()
    # fp64 exact reference, written here
    ex_tv = 0.5 * (mu.exp() - pi.exp()).abs().sum(-1)
    ex_kl = (mu.exp() * (mu - pi)).sum(-1)
    # Tolerances: fp32 log-probs (~1e-7 relative per term); for KL also the fp32 rounding of the "other"
    # bucket when the top-K covers (nearly) everything: mass <= ~1e-7 against a floored log (|log| < 90).
    tol = 2e-6 + 1e-5 * ex_kl.abs()
    tol_kl = tol + 1e-5
    assert torch.all(binary_tv(lp, la).double() <= top_tv + tol)
    assert torch.all(top_tv <= ex_tv + tol)
    assert torch.all(binary_kl(lp, la).double() <= top_kl + tol_kl)
    assert torch.all(top_kl <= ex_kl + tol_kl)
    assert torch.all((exact_tv(pi.float(), mu.float()).double() - ex_tv).abs() <= tol)
    assert torch.all((exact_kl(pi.float(), mu.float()).double() - ex_kl).abs() <= tol)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 16), spread=st.floats(0.01, 3.0))
def test_topk_with_k_equal_vocab_is_exact(seed, v, spread):
    gen = torch.Generator().manual_seed(seed)
    mu, pi = random_dists(gen, 16, v, spread)
    tokens = torch.multinomial(mu.exp(), 1, generator=gen).squeeze(1)
    ids = torch.randperm(v, generator=gen).repeat(16, 1)       # every id, any order
    ex_tv = 0.5 * (mu.exp() - pi.exp()).abs().sum(-1)
    ex_kl = (mu.exp() * (mu - pi)).sum(-1)
    # tolerance: fp32 rounding of the "other" bucket (1 - sum ~ 1e-7) times |log| of a floored bucket
    assert torch.allclose(_topk_div("topk_tv", ids, tokens, mu, pi).double(), ex_tv, atol=1e-5)
    assert torch.allclose(_topk_div("topk_kl", ids, tokens, mu, pi).double(), ex_kl, atol=2e-5)
    a, p = topk_buckets(ids, tokens, mu.gather(1, ids).float(), mu.gather(1, tokens[:, None])[:, 0].float(),
                        pi.gather(1, ids).float(), pi.gather(1, tokens[:, None])[:, 0].float())
    assert torch.allclose(bucket_tv(a, p), ex_tv, atol=1e-5)


def _binary_kl_ref(mu, pi):
    """fp64, log1p-based: mu log(mu/pi) + (1-mu) log((1-mu)/(1-pi))."""
    return mu * (L(mu) - L(pi)) + (1 - mu) * (math.log1p(-mu) - math.log1p(-pi))


@pytest.mark.parametrize("mu", [1 - 1e-7, 0.5, 1e-30, 1e-7])
@pytest.mark.parametrize("pi", [1 - 1e-7, 0.5, 1e-30, 1e-7])
def test_binary_kl_extremes_finite(mu, pi):
    got = binary_kl(torch.tensor([L(pi)], dtype=torch.float32), torch.tensor([L(mu)], dtype=torch.float32))
    assert torch.isfinite(got).all() and got.item() >= 0
    # against fp64 on the fp32-rounded log-probs the function actually sees; rel 1e-3 covers fp32 log-probs
    mu32, pi32 = math.exp(float(_t(L(mu)))), math.exp(float(_t(L(pi))))
    assert got.item() == pytest.approx(max(_binary_kl_ref(mu32, pi32), 0.0), rel=1e-3, abs=1e-9)


def test_binary_kl_at_probability_one_stays_finite():
    got = binary_kl(_t([0.0, L(0.5)]), _t([L(0.5), 0.0]))     # pi = 1 (mu = .5), mu = 1 (pi = .5)
    assert torch.isfinite(got).all()
    assert got[1].item() == pytest.approx(L(2), abs=1e-6)     # 1 * log(1 / .5) + 0


def test_registry_uses_the_anchor_and_names_missing_inputs():
    gen = torch.Generator().manual_seed(0)
    mu, pi = random_dists(gen, 4, 5)
    tok = torch.tensor([0, 1, 2, 3])
    base = dict(logprobs=pi.gather(1, tok[:, None])[:, 0].float(), rollout_logprobs=mu.gather(1, tok[:, None])[:, 0].float(),
                advantages=torch.ones(4), loss_mask=torch.ones(4))
    inp = PolicyInputs(**base)
    got = DIVERGENCES["binary_tv"](inp, inp.rollout_logprobs).value
    assert torch.allclose(got.double(), (pi.exp() - mu.exp()).gather(1, tok[:, None])[:, 0].abs(), atol=1e-6)
    for name, field in [("topk_tv", "topk_ids"), ("topk_kl", "topk_ids"), ("exact_tv", "full_logprobs"),
                        ("exact_kl", "full_logprobs")]:
        with pytest.raises(ValueError, match=rf"PolicyInputs\.{field}"):
            DIVERGENCES[name](inp, inp.rollout_logprobs)
    # top-K registry entries also report mu's tail mass ("other" bucket)
    ids = mu.topk(2, -1).indices
    inp = PolicyInputs(**base, tokens=tok, topk_ids=ids, anchor_topk_logprobs=mu.gather(1, ids).float(),
                       topk_logprobs=pi.gather(1, ids).float())
    d = DIVERGENCES["topk_tv"](inp, inp.rollout_logprobs)
    in_set = torch.zeros(4, 5, dtype=torch.bool).scatter(1, ids, True).scatter(1, tok[:, None], True)
    assert torch.allclose(d.tail_mass.double(), (mu.exp() * ~in_set).sum(-1), atol=1e-6)
