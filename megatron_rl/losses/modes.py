"""The loss modes: each decides the ratio that enters the loss and the mask M_t (algorithms.md Sec. 2).

Unified form (CPPO Sec. 2.2; DPPO Eq. 12):  M_t = 1[ A_t (r_t - 1) <= 0  or  I_t ]. An update that moves
the sampled token back toward the anchor is always kept; I_t only gates the terms pushing pi further away.
Two modes depart from it by definition: `dual_clip` also drops A < 0 tokens with r > clip_ratio_c, and
`gspo` applies the rule to the sequence ratio (so a whole sequence is kept or dropped).

A mode is `fn(cfg, batch) -> ModeResult` (batch: reduce.Batch), registered by name in LOSS_MODES with
what it needs (registry.ModeSpec: its divergence, GSPO's sequence sums, CPPO's context-parallel carries).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .config import LossConfig, _fail
from .cppo import cppo_mask
from .divergence import Divergence
from .inputs import segment_sum
from .reduce import Batch
from .registry import DIVERGENCES, register_mode

# algorithms.md Sec. 1: the log-ratio is clamped at +20 before exp, so the ratio stays finite in fp32
# (e^89 is already inf, and inf times a zero mask or weight is NaN in the loss).
MAX_LOG_RATIO = 20.0


class ModeResult(NamedTuple):
    log_ratio: torch.Tensor               # [N] fp32 with grad: log of the ratio entering the loss
    keep: torch.Tensor                    # [N] bool: M_t
    divergence: Optional[Divergence]      # D_t when the mode uses (or logs) one
    token_metrics: dict                   # name -> [N]: averaged over loss tokens
    seq_metrics: dict                     # name -> [S]: averaged over sequences



def ratio_of(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))


def toward_anchor(adv: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """A (r - 1) <= 0, written as A log r <= 0 (same sign, no exp). A = 0 counts as toward (kept)."""
    return adv * log_ratio.detach() <= 0


def divergence_of(cfg: LossConfig, b: Batch) -> Optional[Divergence]:
    name = cfg.divergence_name
    if name is None:
        return None
    spec = DIVERGENCES[name]
    if spec.topk and b.inp.topk_ids is not None and b.inp.topk_ids.shape[1] != cfg.topk:
        raise ValueError(f"PolicyInputs.topk_ids: K={b.inp.topk_ids.shape[1]} but LossConfig.topk={cfg.topk}")
    return spec(b.inp, b.anchor)


def per_sign_delta(cfg: LossConfig, adv: torch.Tensor):
    """delta_high where A > 0, delta_low where A < 0 (algorithms.md Sec. 2 table: an update that raises a
    good token's probability may be allowed a different step than one that lowers a bad token's); a float
    when they are equal."""
    low, high = cfg.delta_bounds
    if low == high:
        return low
    return torch.where(adv > 0, high, low).to(torch.float64)


# ---- PPO family -----------------------------------------------------------------------------------------

def _ppo_keep(cfg, b, log_ratio):
    r = ratio_of(log_ratio.detach())
    inside = (r >= 1.0 - cfg.eps_low) & (r <= 1.0 + cfg.eps_high)
    return toward_anchor(b.adv, log_ratio) | inside


@register_mode("ppo")
def ppo(cfg: LossConfig, b: Batch) -> ModeResult:
    """Clip-higher PPO as a mask: I_t = 1 - eps_low <= r_t <= 1 + eps_high; gradient-identical to
    min(r A, clip(r) A)."""
    log_ratio = b.lp - b.anchor
    return ModeResult(log_ratio, _ppo_keep(cfg, b, log_ratio), divergence_of(cfg, b), {}, {})


@register_mode("dual_clip")
def dual_clip(cfg: LossConfig, b: Batch) -> ModeResult:
    """PPO plus dual clip (Ye et al. 2020): for A < 0 the loss is capped at -c A, so tokens with
    r > clip_ratio_c get no gradient even though they move toward the anchor."""
    log_ratio = b.lp - b.anchor
    dropped = (b.adv < 0) & (ratio_of(log_ratio.detach()) > cfg.clip_ratio_c)
    keep = _ppo_keep(cfg, b, log_ratio) & ~dropped
    return ModeResult(log_ratio, keep, divergence_of(cfg, b), {"dual_clip_frac": dropped}, {})


# ---- DPPO: a divergence threshold ------------------------------------------------------------------------

def _dppo(cfg: LossConfig, b: Batch) -> ModeResult:
    """DPPO (algorithms.md Sec. 2 table; DPPO Eq. 12, DPPO Sec. 4.4): I_t = D_t <= delta (delta_high if
    A > 0, delta_low if A < 0). Compared in fp64, as CPPO does, so that CPPO's DPPO limit is exact to the
    last bit."""
    log_ratio = b.lp - b.anchor
    div = divergence_of(cfg, b)
    inside = div.value.to(torch.float64) <= per_sign_delta(cfg, b.adv)
    return ModeResult(log_ratio, toward_anchor(b.adv, log_ratio) | inside, div, {}, {})


# one DPPO mode per registered divergence, named after it and defined by it
for _div in tuple(DIVERGENCES):
    register_mode(f"dppo_{_div}", divergence=_div, divergence_fixed=True)(_dppo)


# ---- CPPO: position-weighted threshold + cumulative prefix budget ----------------------------------------

# any divergence; binary_tv by default, the only one the authors' code has (algorithms.md Sec. 10)
@register_mode("cppo", divergence="binary_tv", cp_scan=True)
def cppo(cfg: LossConfig, b: Batch) -> ModeResult:
    """CPPO (algorithms.md Sec. 4; CPPO Eq. 8-10): I_t = w_t D_t <= c_t from the segmented scan in cppo.py."""
    if cfg.horizon == "max" and b.counts.max_response_length is None:
        raise ValueError("GlobalCounts.max_response_length: required by cppo with horizon 'max'")
    log_ratio = b.lp - b.anchor
    div = divergence_of(cfg, b)
    inp = b.inp
    cm = cppo_mask(div.value, b.m, inp.cu_seqlens, delta=per_sign_delta(cfg, b.adv), w_min=cfg.w_min,
                   horizon=cfg.horizon, max_response_length=b.counts.max_response_length,
                   delta_b_mode=cfg.delta_b_mode, delta_b=cfg.delta_b, delta_b_min=cfg.delta_b_min,
                   cap_mult=cfg.cap_mult, seg_num_tokens=inp.seg_num_tokens,
                   seg_tokens_before=inp.seg_tokens_before, seg_prefix_z=inp.seg_prefix_z,
                   seg_delta_b=inp.seg_delta_b, check=inp.values_checked)
    keep = toward_anchor(b.adv, log_ratio) | cm.inside
    return ModeResult(log_ratio, keep, div, {"cppo_budget_only_frac": cm.budget_only & ~keep},
                      {"cppo_delta_b_mean": cm.delta_b})


# ---- sequence-level and unmasked baselines --------------------------------------------------------------

@register_mode("gspo", seq_log_ratio_sum=True)
def gspo(cfg: LossConfig, b: Batch) -> ModeResult:
    """GSPO (Zheng et al. 2025, GSPO-token form): s_i = exp(mean_t log r_t) over the sequence's loss tokens;
    the token ratio is sg(s_i) * pi_t / sg(pi_t), so the gradient is s_i * grad log pi_t. Mask: the unified
    rule on s_i with 1 - gspo_eps_low <= s_i <= 1 + gspo_eps_high."""
    token_lr = b.lp - b.anchor
    if b.inp.seg_log_ratio_sum is not None:
        total = b.inp.seg_log_ratio_sum.to(device=b.lp.device, dtype=torch.float32)
    else:
        total = segment_sum(token_lr.detach() * b.mf, b.seg, b.inp.num_segments)
    seq_lr = (total / b.seg_tokens.clamp(min=1).to(torch.float32))[b.seg]
    log_ratio = seq_lr + b.lp - b.lp.detach()
    s = ratio_of(seq_lr)
    inside = (s >= 1.0 - cfg.gspo_eps_low) & (s <= 1.0 + cfg.gspo_eps_high)
    return ModeResult(log_ratio, toward_anchor(b.adv, seq_lr) | inside, divergence_of(cfg, b), {}, {})


def _unmasked(cfg: LossConfig, b: Batch) -> ModeResult:
    """No trust region (I_t = 1): `pg_is` is plain importance-weighted policy gradient; `cispo` is the same
    with the cap C on the detached ratio required (MiniMax-M1's CISPO, upper bound only)."""
    log_ratio = b.lp - b.anchor
    return ModeResult(log_ratio, torch.ones_like(b.m), divergence_of(cfg, b), {}, {})


def _check_cispo(cfg: LossConfig) -> None:
    if cfg.tis_cap is None:
        _fail("tis_cap", None, "a finite cap C > 0 (cispo is unmasked and relies on the cap)")
    if cfg.loss_form != "reinforce":
        _fail("loss_form", cfg.loss_form, "'reinforce' (cispo is defined by its detached capped weight)")


register_mode("cispo", check=_check_cispo)(_unmasked)
register_mode("pg_is")(_unmasked)
