"""Train-inference mismatch: how far mu (the engine's log-probs) is from pi at identical weights.

Pure torch on local per-token tensors, so the loop can log it (algorithms.md section 7: mean and max
|pi_a - mu_a| on sampled tokens, measured before the first update). The helpers that turn logits into
per-token log-probs apply the same temperature vLLM's `processed_logprobs` does.
"""

from __future__ import annotations

from typing import Optional

import torch


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) at several ids per position, in fp32. logits [..., V], ids [..., K] -> [..., K]."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return lp.gather(-1, ids.long())


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) at `targets`, in fp32. logits [..., V], targets [...] -> [...]."""
    return logprobs_at(logits, targets.unsqueeze(-1), temperature).squeeze(-1)


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs) of the k most probable tokens of log_softmax(logits / T), in rank order."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    return ids, vals


def logprob_mismatch(learner_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> dict[str, float]:
    """|pi_a - mu_a| (probabilities) and |log pi_a - log mu_a| over the masked tokens.

    Returns sums and counts beside means so data-parallel ranks can all-reduce before dividing:
    `prob_diff_sum / num_tokens` is the global mean, `prob_diff_max` reduces with max.
    """
    if learner_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(f"shapes differ: learner {tuple(learner_logprobs.shape)} vs rollout "
                         f"{tuple(rollout_logprobs.shape)}")
    pi, mu = learner_logprobs.detach().double(), rollout_logprobs.detach().double()
    m = torch.ones_like(pi, dtype=torch.bool) if mask is None else mask.bool()
    if m.shape != pi.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} differs from log-prob shape {tuple(pi.shape)}")
    dp = (pi.exp() - mu.exp()).abs()[m]
    dl = (pi - mu).abs()[m]
    n = int(m.sum())
    return {
        "num_tokens": n,
        "prob_diff_sum": float(dp.sum()),
        "prob_diff_mean": float(dp.sum()) / n if n else 0.0,
        "prob_diff_max": float(dp.max()) if n else 0.0,
        "logprob_diff_mean": float(dl.sum()) / n if n else 0.0,
        "logprob_diff_max": float(dl.max()) if n else 0.0,
    }
