"""The registries of the losses: every loss mode, divergence and aggregation mode by name, with what it needs.

Each variant is a named function registered here by the module that defines it (modes.py, divergence.py,
reduce.py), together with a small record of the inputs it needs. Every other layer asks this record (most
often through `needs(cfg)`, also `LossConfig.needs`) instead of testing the name: whether the rollout must
record mu's top-K, whether the full vocabulary is needed, which per-sequence values context parallel must
complete (algorithms.md Sec. 4, *Parallelism*). LossConfig lists its allowed values from these dicts, so
registering a variant is the whole of adding it.

A record is callable like the function it wraps (`LOSS_MODES[name](cfg, batch)`,
`DIVERGENCES[name](inputs, anchor_logprobs)`, `AGGREGATIONS[name](batch)`).

This module imports nothing of the package (config.py imports it to validate). The dicts are filled while
`megatron_rl.losses` is imported, and importing any of its submodules imports the package first, so they
are full before any LossConfig is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:   # annotations only: the modules below import this one
    from .config import LossConfig


@dataclass(frozen=True)
class _Spec:
    """A registered function and its name; calling the record calls the function."""

    name: str
    fn: Callable[..., Any]

    def __call__(self, *args):
        return self.fn(*args)


@dataclass(frozen=True)
class ModeSpec(_Spec):
    """A loss mode (algorithms.md Sec. 2): fn(cfg, batch: reduce.Batch) -> modes.ModeResult, and its needs."""

    # The divergence the mode masks on. None: it masks on none (cfg.divergence, if set, is only logged).
    divergence: Optional[str] = None
    # True: the mode is defined by `divergence` (dppo_*), so cfg.divergence may only be None or it;
    # False: `divergence` is the default and cfg.divergence may name any other (cppo).
    divergence_fixed: bool = False
    # Needs each sequence's sum of m_t * log r_t (GSPO's sequence ratio): under context parallel a
    # sequence is split over ranks, so the sum is all-gathered (seg_log_ratio_sum).
    seq_log_ratio_sum: bool = False
    # Needs the prefix-scan carries across context-parallel chunks (CPPO's budget: seg_tokens_before,
    # seg_prefix_z, seg_delta_b), because its mask at t depends on every earlier token of the sequence.
    cp_scan: bool = False
    # Mode-specific rules on the rest of the config, run by LossConfig's validation (raise ValueError).
    check: Optional[Callable[["LossConfig"], None]] = None


@dataclass(frozen=True)
class DivergenceSpec(_Spec):
    """A divergence D(anchor || pi) (algorithms.md Sec. 3): fn(inputs, anchor_logprobs) -> Divergence."""

    default_delta: float          # delta when LossConfig.delta is None (algorithms.md Sec. 3 "Defaults")
    topk: bool = False            # needs the anchor's top-K ids and both policies' log-probs at them
    full_logprobs: bool = False   # needs both policies' [N, V] log-probs (the whole vocabulary)


@dataclass(frozen=True)
class AggregationSpec(_Spec):
    """A loss_agg_mode (algorithms.md Sec. 5): fn(batch: reduce.Batch) -> [N] per-token weights."""

    max_response_length: bool = False   # needs GlobalCounts.max_response_length (Dr. GRPO's constant L)


LOSS_MODES: dict[str, ModeSpec] = {}
DIVERGENCES: dict[str, DivergenceSpec] = {}
AGGREGATIONS: dict[str, AggregationSpec] = {}


def _registrar(table: dict, spec_type: type):
    """The decorator factory of one registry: `@register(name, **fields)` records spec_type(name, fn, **fields)."""
    def register(name: str, **needs):
        def deco(fn):
            if name in table:
                raise ValueError(f"{name!r} is registered twice")
            table[name] = spec_type(name, fn, **needs)
            return fn
        return deco
    return register


register_mode = _registrar(LOSS_MODES, ModeSpec)                     # fn(cfg, batch) -> ModeResult
register_divergence = _registrar(DIVERGENCES, DivergenceSpec)        # fn(inputs, anchor_logprobs) -> Divergence
register_aggregation = _registrar(AGGREGATIONS, AggregationSpec)     # fn(batch) -> [N] weights


# ---- what a configuration needs ------------------------------------------------------------------------

@dataclass(frozen=True)
class LossNeeds:
    """The inputs one LossConfig needs, resolved from its mode's and divergence's records."""

    divergence: Optional[str]     # the divergence computed (masked on, or only logged); None: none
    topk: int                     # K of the anchor's top-K ids and log-probs (0: no top-K divergence)
    rollout_topk: int             # K the rollout must record for mu: `topk` when mu is the anchor, else 0
    #                               (with anchor 'old' the ids would be pi_old's: algorithms.md Sec. 3)
    full_logprobs: bool           # [N, V] log-probs of pi and of the anchor (exact divergences)
    seq_log_ratio_sum: bool       # per-sequence log-ratio sums, completed across CP chunks (GSPO)
    cp_scan: bool                 # prefix-scan carries across CP chunks (CPPO)


def divergence_name(cfg: "LossConfig") -> Optional[str]:
    """The divergence `cfg` computes: the mode's own when fixed, else cfg.divergence or the mode's default."""
    mode = LOSS_MODES[cfg.mode]
    if mode.divergence_fixed:
        return mode.divergence
    return cfg.divergence or mode.divergence


def needs(cfg: "LossConfig") -> LossNeeds:
    """What the configured mode and divergence need; every layer asks this instead of matching names."""
    mode = LOSS_MODES[cfg.mode]
    name = divergence_name(cfg)
    div = DIVERGENCES[name] if name is not None else None
    topk = cfg.topk if div is not None and div.topk else 0
    return LossNeeds(divergence=name, topk=topk, rollout_topk=topk if cfg.anchor == "rollout" else 0,
                     full_logprobs=div is not None and div.full_logprobs,
                     seq_log_ratio_sum=mode.seq_log_ratio_sum, cp_scan=mode.cp_scan)
