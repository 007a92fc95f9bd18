"""Sequence advantages from verifiable rewards, per prompt group (algorithms.md section 6).

- GRPO: A_i = R_i - mean(R of the group); divided by (std + eps) only when `std_normalize` (off by
  default, as in both papers' scripts). std is the sample std (unbiased, like torch.std / verl).
- RLOO: A_i = R_i - mean of the OTHER samples' rewards = n / (n - 1) * (R_i - mean).
- A group of one sample has no baseline: its advantage is 0.
- Dynamic sampling (DAPO): a group whose rewards are all equal carries no signal; optionally drop it,
  and return how many groups were dropped for the logs.
Groups are given by id per sample (any integers, any order), so a filtered rollout still works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ESTIMATORS = ("grpo", "rloo")


@dataclass(frozen=True)
class AdvantageConfig:
    estimator: str = "grpo"
    std_normalize: bool = False        # GRPO only: divide by the group's std + eps
    drop_uniform_groups: bool = False  # DAPO dynamic sampling
    constant_atol: float = 0.0         # rewards within this of each other count as equal
    eps: float = 1e-6

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"advantage config: `estimator` is {self.estimator!r}; allowed: {', '.join(ESTIMATORS)}")
        if self.std_normalize and self.estimator != "grpo":
            raise ValueError("advantage config: `std_normalize` applies to estimator 'grpo' only")
        if self.constant_atol < 0:
            raise ValueError(f"advantage config: `constant_atol` must be >= 0, got {self.constant_atol}")
        if not self.eps > 0:
            raise ValueError(f"advantage config: `eps` must be > 0, got {self.eps}")


@dataclass
class AdvantageResult:
    advantages: torch.Tensor      # [N] float32, one per sample (0 for dropped samples)
    keep: torch.Tensor            # [N] bool: False for samples of dropped groups
    num_groups: int
    num_dropped_groups: int

    def metrics(self, prefix: str = "advantages/") -> dict[str, float]:
        kept = self.advantages[self.keep]
        return {f"{prefix}groups": self.num_groups, f"{prefix}dropped_groups": self.num_dropped_groups,
                f"{prefix}mean_abs": float(kept.abs().mean()) if kept.numel() else 0.0}


def _group_stats(rewards: torch.Tensor, inverse: torch.Tensor, num_groups: int):
    r = rewards.double()
    per_group = lambda fill: torch.full((num_groups,), fill, dtype=torch.float64, device=r.device)  # noqa: E731
    count = per_group(0.0).index_add_(0, inverse, torch.ones_like(r))
    mean = per_group(0.0).index_add_(0, inverse, r) / count
    sq = per_group(0.0).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    var = sq / (count - 1).clamp(min=1)
    rmin = per_group(float("inf")).scatter_reduce_(0, inverse, r, "amin")
    rmax = per_group(float("-inf")).scatter_reduce_(0, inverse, r, "amax")
    return count, mean, var.sqrt(), rmax - rmin


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, config: AdvantageConfig) -> AdvantageResult:
    """Per-sample advantages of `rewards` [N] grouped by `group_ids` [N]."""
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids)
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be "
                         "1-D of the same length")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; SafeReward maps failed rewards to a finite value")
    if rewards.numel() == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=rewards.device)
        return AdvantageResult(empty, torch.zeros(0, dtype=torch.bool, device=rewards.device), 0, 0)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    count, mean, std, spread = _group_stats(rewards, inverse, num_groups)
    r = rewards.double()
    centred = r - mean[inverse]
    n = count[inverse]
    if config.estimator == "grpo":
        adv = centred / (std[inverse] + config.eps) if config.std_normalize else centred
    else:   # rloo: R_i - (sum - R_i) / (n - 1)
        adv = centred * n / (n - 1).clamp(min=1)
    adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    constant = spread <= config.constant_atol
    if config.drop_uniform_groups:
        keep = ~constant[inverse]
        dropped = int(constant.sum())
    else:
        keep = torch.ones_like(rewards, dtype=torch.bool)
        dropped = 0
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return AdvantageResult(adv.float(), keep, num_groups, dropped)
