"""compute_policy_loss: mode mask -> per-token loss (REINFORCE or surrogate form, cap C) -> train-inference
correction -> KL-to-reference and entropy terms -> aggregation with global counts -> metrics.
"""

from __future__ import annotations

import torch

from .config import LossConfig
from .inputs import GlobalCounts, PolicyInputs
from .modes import MAX_LOG_RATIO, ratio_of
from .reduce import Batch
from .registry import LOSS_MODES


def compute_policy_loss(cfg: LossConfig, inputs: PolicyInputs, counts: GlobalCounts
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (fp32 scalar, with grad) and metrics (0-d fp32 tensors, detached) of one local microbatch.

    Per token (m_t = loss_mask, M_t = the mode's mask, r_t = the mode's ratio, C = cfg.tis_cap):
      reinforce (DPPO Eq. 23):  pg_t = -A_t * sg(min(r_t, C)) * M_t * logprobs_t
      surrogate:                pg_t = -A_t * min(r_t, C) * M_t      (same gradient while r_t < C; none above C)
      times sg(the rollout correction weight) when cfg.rollout_correction != 'none'
      loss_t = pg_t + kl_coef * KL_t(pi || ref) - entropy_coef * entropy_t
    loss = sum_t weight_t * loss_t, weight_t (0 off the loss mask) from cfg.loss_agg_mode and the GLOBAL
    counts (reduce.py).
    Note the REINFORCE form's value is not the surrogate's value; only its gradient is meaningful.
    """
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg: expected a LossConfig, got {type(cfg).__name__}")
    if not isinstance(inputs, PolicyInputs):
        raise ValueError(f"inputs: expected PolicyInputs, got {type(inputs).__name__}")
    if not isinstance(counts, GlobalCounts):
        raise ValueError(f"counts: expected GlobalCounts, got {type(counts).__name__}")
    b = Batch(cfg.anchor, inputs, counts)
    res = LOSS_MODES[cfg.mode](cfg, b)
    adv = b.adv
    metrics: dict[str, torch.Tensor] = {}

    r_det = ratio_of(res.log_ratio.detach())
    cap = cfg.tis_cap
    if cfg.loss_form == "reinforce":
        weight = r_det if cap is None else r_det.clamp(max=cap)
        pg = -adv * weight * b.lp                                          # DPPO Eq. 23
    else:
        r = ratio_of(res.log_ratio)
        pg = -adv * (r if cap is None else r.clamp(max=cap))
    keep_f = res.keep.float()              # M_t; products with float masks (inputs are finite: no 0 * inf)

    if cfg.rollout_correction != "none":
        # algorithms.md Sec. 2.3: with anchor pi_old the ratio ignores that mu sampled the tokens, so the
        # mask is weighted by k = pi_old / mu (detached).
        k = torch.exp((inputs.old_logprobs.float() - inputs.rollout_logprobs.float()).clamp(max=MAX_LOG_RATIO))
        if cfg.rollout_correction == "tis":
            corr = k.clamp(max=cfg.rollout_is_cap)
            metrics["rollout_is_truncated_frac"] = b.token_mean(k > cfg.rollout_is_cap)
        else:  # icepop: keep k in [low, high], drop the token otherwise
            in_range = (k >= cfg.icepop_low) & (k <= cfg.icepop_high)
            corr = k * in_range
            metrics["icepop_masked_frac"] = b.token_mean(~in_range)
        keep_f = keep_f * corr
        metrics["rollout_is_mean"] = b.token_mean(k)
        metrics["rollout_is_max"] = b.local_max(k)

    weights = b.weights(cfg.loss_agg_mode)                                 # 0 off the loss mask
    pg = pg * keep_f
    metrics["pg_loss"] = torch.dot(pg.detach(), weights)
    token_loss = pg
    if cfg.kl_coef > 0 or inputs.ref_logprobs is not None:
        if inputs.ref_logprobs is None:
            raise ValueError("PolicyInputs.ref_logprobs: required when LossConfig.kl_coef > 0")
        kl = kl_to_reference(b.lp, inputs.ref_logprobs.float(), cfg.kl_estimator)
        metrics["kl_ref"] = b.token_mean(kl)
        if cfg.kl_coef > 0:
            token_loss = token_loss + cfg.kl_coef * kl
    if cfg.entropy_coef > 0 or inputs.entropy is not None:
        if inputs.entropy is None:
            raise ValueError("PolicyInputs.entropy: required when LossConfig.entropy_coef > 0")
        metrics["entropy"] = b.token_mean(inputs.entropy)
        if cfg.entropy_coef > 0:
            token_loss = token_loss - cfg.entropy_coef * inputs.entropy.float()

    loss = torch.dot(token_loss, weights)
    _metrics(cfg, b, res, r_det, metrics)
    return loss, metrics


def kl_to_reference(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """[N] per-token estimate of KL(pi || ref) from tokens sampled by pi (Schulman's k1 / k2 / k3), with grad."""
    log_r = ref_logprobs - logprobs                    # log(ref / pi)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        log_r = log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        return torch.expm1(log_r) - log_r   # = exp(x) - 1 - x without cancelling to < 0 for tiny x
    raise ValueError(f"kl_estimator: got {estimator!r}; allowed: 'k1', 'k2', 'k3'")


def _metrics(cfg, b, res, r_det, out):
    """algorithms.md Sec. 7, the part the loss can know. Keys ending in `_max` are local maxima (reduce with
    max); every other key is a partial already divided by the global counts (reduce with sum)."""
    adv = b.adv
    masked = ~res.keep                                   # (restricted to loss tokens by token_mean)
    pos, neg = adv > 0, adv < 0
    out["masked_frac"] = b.token_mean(masked)
    out["masked_frac_adv_pos"] = b.token_mean(masked & pos)
    out["masked_frac_adv_neg"] = b.token_mean(masked & neg)
    out["adv_pos_frac"] = b.token_mean(pos)
    out["adv_neg_frac"] = b.token_mean(neg)
    out["ratio_mean"] = b.token_mean(r_det)
    out["ratio_max"] = b.local_max(r_det)
    out["ratio_above_cap_frac"] = (b.token_mean(r_det > cfg.tis_cap) if cfg.tis_cap is not None
                                   else b.token_mean(torch.zeros_like(b.m)))
    log_r = (b.lp.detach() - b.anchor).clamp(max=MAX_LOG_RATIO)
    out["approx_kl_k3"] = b.token_mean(torch.exp(log_r) - 1.0 - log_r)      # KL(anchor || pi), k3
    mismatch = (b.lp.detach().exp() - b.inp.rollout_logprobs.float().exp()).abs()  # |pi_a - mu_a| on a_t
    out["mismatch_tv_mean"] = b.token_mean(mismatch)
    out["mismatch_tv_max"] = b.local_max(mismatch)
    if res.divergence is not None:
        out["divergence_mean"] = b.token_mean(res.divergence.value)
        out["divergence_max"] = b.local_max(res.divergence.value)
        if res.divergence.tail_mass is not None:
            out["topk_tail_mass_mean"] = b.token_mean(res.divergence.tail_mass)
            out["topk_tail_mass_max"] = b.local_max(res.divergence.tail_mass)
            out["topk_ids_from_old_max"] = torch.tensor(float(b.inp.topk_ids_source == "old"), device=b.device)
    for name, v in res.token_metrics.items():
        out[name] = b.token_mean(v)
    for name, v in res.seq_metrics.items():
        out[name] = b.sequence_mean(v)
