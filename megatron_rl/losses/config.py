"""LossConfig: every knob of the policy losses, validated once at construction.

Defaults are those of docs/algorithms.md (cited per field). Where the spec is silent the papers decide, and
the field's comment says which paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from . import registry

# The option values of the fields that are not registries. Modes, divergences and aggregation modes are
# validated against registry.LOSS_MODES / DIVERGENCES / AGGREGATIONS, filled by modes.py, divergence.py
# and reduce.py (the package exports their names as MODES, DIVERGENCE_NAMES, AGG_MODES).
ANCHORS = ("rollout", "old")
LOSS_FORMS = ("reinforce", "surrogate")
HORIZONS = ("sequence", "max")
DELTA_B_MODES = ("fixed", "p90")
ROLLOUT_CORRECTIONS = ("none", "tis", "icepop")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class LossConfig:
    """Typed loss configuration; raises ValueError naming the field and the allowed values."""

    mode: str = "dppo_binary_tv"        # a registered mode; the project's headline method (DPPO Sec. 4.4)
    anchor: str = "rollout"             # algorithms.md Sec. 1: mu by default (DPPO Sec. 5.2); `old` = pi_old
    loss_form: str = "reinforce"        # algorithms.md Sec. 2.1: DPPO Eq. 23 (authors' code); `surrogate` = -A r M
    loss_agg_mode: str = "seq-mean-token-sum-norm"  # algorithms.md Sec. 5: both papers' scripts (Dr. GRPO)
    tis_cap: Optional[float] = None     # C, algorithms.md Sec. 2.1: None = no cap; DPPO Sec. 5.4 found capping
    #                                     hurts (verl's clip_ratio_c = 3.0 silently caps its DPPO at 3)

    # ppo / dual_clip (algorithms.md Sec. 2): asymmetric clip-higher; dual-clip bound for A < 0 (Ye et al.
    # 2020 use 3).
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_ratio_c: float = 3.0

    # DPPO / CPPO trust region. delta None = the divergence's default (algorithms.md Sec. 3 "Defaults");
    # delta_low / delta_high (for A < 0 / A > 0) default to delta (algorithms.md Sec. 2 table).
    divergence: Optional[str] = None    # cppo: which D (default binary_tv: the authors' code has no other);
    #                                     dppo_*: None or the one the mode names; other modes: None, or a
    #                                     D logged as a metric only (registry.ModeSpec.divergence)
    delta: Optional[float] = None
    delta_low: Optional[float] = None
    delta_high: Optional[float] = None
    topk: int = 20                      # K of the top-K divergences: vLLM's default max_logprobs

    # CPPO (algorithms.md Sec. 4; CPPO Eq. 8-9, 22)
    w_min: float = 0.8
    horizon: str = "max"                # `max` reproduces the paper's runs (verl PR 6731)
    delta_b_mode: str = "fixed"
    delta_b: float = 0.015              # fixed prefix-average budget; math.inf allowed (DPPO limit)
    delta_b_min: float = 0.02           # p90 calibration floor (Eq. 22)
    cap_mult: float = 2.0               # p90 ceiling = cap_mult * delta_b_min (the paper; verl later 5)

    # GSPO (Zheng et al. 2025, Sec. 5.1): sequence-ratio clip range; GSPO's paper aggregates with
    # seq-mean-token-mean (set loss_agg_mode yourself: this config does not override it).
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4

    # Train-inference corrections against mu when anchor == "old" (algorithms.md Sec. 2.3: the ratio is
    # then against pi_old, so sampling from mu needs its own correction). TIS: weight min(pi_old/mu, cap)
    # (Yao et al. 2025 use cap 2). IcePop: keep pi_old/mu in [icepop_low, icepop_high], else drop the token
    # (Ring-1T / IcePop: 0.5 and 5).
    rollout_correction: str = "none"
    rollout_is_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0

    # KL to a reference policy (added to the loss, same aggregation) and entropy bonus (subtracted).
    kl_coef: float = 0.0
    kl_estimator: str = "k3"            # GRPO's choice (Shao et al. 2024)
    entropy_coef: float = 0.0

    def __post_init__(self):
        _choice(self, "mode", tuple(registry.LOSS_MODES))
        _choice(self, "anchor", ANCHORS)
        _choice(self, "loss_form", LOSS_FORMS)
        _choice(self, "loss_agg_mode", tuple(registry.AGGREGATIONS))
        _choice(self, "horizon", HORIZONS)
        _choice(self, "delta_b_mode", DELTA_B_MODES)
        _choice(self, "rollout_correction", ROLLOUT_CORRECTIONS)
        _choice(self, "kl_estimator", KL_ESTIMATORS)
        if self.divergence is not None:
            _choice(self, "divergence", tuple(registry.DIVERGENCES))
        mode = registry.LOSS_MODES[self.mode]
        if mode.divergence_fixed and self.divergence not in (None, mode.divergence):
            _fail("divergence", self.divergence, f"None or {mode.divergence!r} (implied by mode {self.mode!r})")

        _number(self, "tis_cap", lo=0.0, lo_open=True, optional=True)
        _number(self, "eps_low", lo=0.0, hi=1.0, hi_open=True)
        _number(self, "eps_high", lo=0.0)
        _number(self, "clip_ratio_c", lo=1.0, lo_open=True)
        for name in ("delta", "delta_low", "delta_high"):
            _number(self, name, lo=0.0, optional=True)
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            _fail("topk", self.topk, "an int >= 1")
        _number(self, "w_min", lo=0.0, lo_open=True, hi=1.0)
        _number(self, "delta_b", lo=0.0, allow_inf=True)
        _number(self, "delta_b_min", lo=0.0, lo_open=True)
        _number(self, "cap_mult", lo=1.0)
        _number(self, "gspo_eps_low", lo=0.0, hi=1.0, hi_open=True)
        _number(self, "gspo_eps_high", lo=0.0)
        _number(self, "rollout_is_cap", lo=0.0, lo_open=True)
        _number(self, "icepop_low", lo=0.0)
        _number(self, "icepop_high", lo=self.icepop_low, lo_open=True)
        _number(self, "kl_coef", lo=0.0)
        _number(self, "entropy_coef", lo=0.0)

        if mode.check is not None:       # the mode's own rules (e.g. cispo requires the cap)
            mode.check(self)
        if self.rollout_correction != "none" and self.anchor != "old":
            _fail("rollout_correction", self.rollout_correction,
                  "'none' when anchor='rollout' (the ratio is already against mu); use anchor='old'")

    # ---- resolved values -------------------------------------------------------------------------------
    @property
    def divergence_name(self) -> Optional[str]:
        """The divergence the mode masks on (or logs): dppo_* imply theirs, cppo defaults to binary_tv."""
        return registry.divergence_name(self)

    @property
    def needs(self) -> registry.LossNeeds:
        """The inputs this configuration needs (top-K, full log-probs, CP completions): registry.needs."""
        return registry.needs(self)

    @property
    def delta_bounds(self) -> tuple[float, float]:
        """(delta_low, delta_high): thresholds for A < 0 and A > 0 (algorithms.md Sec. 2 table)."""
        base = (self.delta if self.delta is not None
                else registry.DIVERGENCES[self.divergence_name or "binary_tv"].default_delta)
        low = self.delta_low if self.delta_low is not None else base
        high = self.delta_high if self.delta_high is not None else base
        return float(low), float(high)


def _fail(name, value, allowed):
    raise ValueError(f"LossConfig.{name}: got {value!r}; allowed: {allowed}")


def _choice(cfg, name, allowed):
    value = getattr(cfg, name)
    if value not in allowed:
        _fail(name, value, ", ".join(repr(a) for a in allowed))


def _number(cfg, name, lo=None, hi=None, lo_open=False, hi_open=False, optional=False, allow_inf=False):
    value = getattr(cfg, name)
    if value is None and optional:
        return
    lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    allowed = " and ".join(s for s in (lo_s, hi_s) if s) or "a number"
    allowed = "a finite number " + allowed + (" (inf allowed)" if allow_inf else "") + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _fail(name, value, allowed)
    if math.isinf(value) and not (allow_inf and value > 0):
        _fail(name, value, allowed)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(name, value, allowed)
    if hi is not None and (value > hi or (hi_open and value == hi)):
        _fail(name, value, allowed)


