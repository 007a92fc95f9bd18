"""LossConfig: spec defaults (algorithms.md) and validation at construction."""

import math

import pytest

from megatron_rl.losses import LOSS_MODES, MODES, LossConfig, LossNeeds


def test_defaults_are_the_spec():
    c = LossConfig()
    assert (c.eps_low, c.eps_high) == (0.2, 0.28)
    assert c.tis_cap is None                      # infinity, not verl's 3.0
    assert c.anchor == "rollout" and c.loss_form == "reinforce"
    assert (c.w_min, c.horizon, c.delta_b_mode, c.delta_b) == (0.8, "max", "fixed", 0.015)
    assert (c.delta_b_min, c.cap_mult, c.topk) == (0.02, 2.0, 20)
    expected = {"dppo_binary_tv": 0.15, "dppo_binary_kl": 0.05, "dppo_topk_tv": 0.15, "dppo_topk_kl": 0.05,
                "dppo_exact_tv": 0.15, "dppo_exact_kl": 0.05}
    for mode, delta in expected.items():
        assert LossConfig(mode=mode).delta_bounds == (delta, delta)
    cppo = LossConfig(mode="cppo")
    assert cppo.divergence_name == "binary_tv" and cppo.delta_bounds == (0.15, 0.15)
    assert LossConfig(mode="cppo", divergence="topk_kl").delta_bounds == (0.05, 0.05)
    assert LossConfig(mode="cppo", delta=0.2, delta_low=0.1).delta_bounds == (0.1, 0.2)
    assert LossConfig(mode="ppo").divergence_name is None


def test_every_mode_is_registered_and_constructible():
    assert set(MODES) == set(LOSS_MODES)
    for mode in MODES:
        LossConfig(mode=mode, tis_cap=5.0 if mode == "cispo" else None)


def test_infinite_budget_is_allowed():
    assert LossConfig(mode="cppo", delta_b=math.inf).delta_b == math.inf


@pytest.mark.parametrize("field, value", [
    ("mode", "grpo"), ("mode", "DPPO_BINARY_TV"), ("anchor", "ref"), ("loss_form", "clip"),
    ("loss_agg_mode", "mean"), ("horizon", "full"), ("delta_b_mode", "p95"), ("divergence", "js"),
    ("rollout_correction", "is"), ("kl_estimator", "k4"),
    ("delta", -0.1), ("delta_low", -1e-9), ("delta_high", float("nan")), ("delta", float("inf")),
    ("w_min", 0.0), ("w_min", 1.5), ("w_min", -0.2), ("topk", 0), ("topk", -3), ("topk", 2.5), ("topk", True),
    ("eps_low", 1.0), ("eps_low", -0.1), ("eps_high", -0.1), ("clip_ratio_c", 1.0), ("tis_cap", 0.0),
    ("tis_cap", -1.0), ("delta_b", -0.01), ("delta_b", float("-inf")), ("delta_b_min", 0.0),
    ("cap_mult", 0.5), ("kl_coef", -1.0), ("entropy_coef", -0.1), ("icepop_low", -1.0),
    ("rollout_is_cap", 0.0), ("gspo_eps_low", 1.0), ("eps_high", "0.2"),
])
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LossConfig\.{field}: .*allowed"):
        LossConfig(**{field: value})


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="cispo"), "tis_cap"),                                   # cispo relies on the cap
    (dict(mode="cispo", tis_cap=2.0, loss_form="surrogate"), "loss_form"),
    (dict(rollout_correction="tis"), "rollout_correction"),            # only against mu when anchor is old
    (dict(mode="dppo_binary_tv", divergence="topk_kl"), "divergence"),  # mode implies its divergence
    (dict(icepop_low=2.0, icepop_high=1.0), "icepop_high"),
])
def test_inconsistent_combinations_raise(kwargs, field):
    with pytest.raises(ValueError, match=rf"LossConfig\.{field}: "):
        LossConfig(**kwargs)


def test_valid_combinations():
    LossConfig(rollout_correction="icepop", anchor="old")
    LossConfig(mode="dppo_topk_kl", divergence="topk_kl")
    LossConfig(mode="ppo", divergence="binary_tv")   # D logged as a metric only


def test_needs_come_from_the_registry():
    """What a configuration needs is read from the mode's and divergence's registry records, not names."""
    from megatron_rl.losses import AGG_MODES, DIVERGENCE_NAMES, DIVERGENCES

    assert LossConfig(mode="ppo").needs == LossNeeds(None, 0, 0, False, False, False)
    assert LossConfig(mode="dppo_topk_kl", topk=7).needs == LossNeeds("topk_kl", 7, 7, False, False, False)
    assert LossConfig(mode="cppo", divergence="topk_tv", anchor="old").needs == LossNeeds(
        "topk_tv", 20, 0, False, False, True)        # with anchor 'old' the top-K ids are not mu's
    assert LossConfig(mode="dppo_exact_tv").needs.full_logprobs
    assert LossConfig(mode="gspo").needs.seq_log_ratio_sum and not LossConfig(mode="gspo").needs.cp_scan
    assert LossConfig(mode="ppo", divergence="topk_tv").needs.topk == 20     # a logged divergence counts
    for name in DIVERGENCE_NAMES:     # one DPPO mode per divergence, defined by it
        assert LossConfig(mode=f"dppo_{name}").needs.divergence == name
        assert DIVERGENCES[name].topk == (LossConfig(mode=f"dppo_{name}").needs.topk > 0)
    with pytest.raises(ValueError, match="allowed: " + ", ".join(repr(a) for a in AGG_MODES)):
        LossConfig(loss_agg_mode="mean")
