"""Train-inference mismatch: how far mu (the engine's log-probs) is from pi at identical weights.

Pure torch on local per-token tensors, so the loop can log it (algorithms.md section 7: mean and max
|pi_a - mu_a| on sampled tokens, measured before the first update). The helpers that turn logits into
per-token log-probs apply the same temperature vLLM's `processed_logprobs` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_rl.rollout.types import Rollout


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


# The weight-sync probe's tolerance on max |log mu - log pi| over its tokens, by the coarser of the
# engine's and the learner's dtypes. fp32: a correct sync measures <= 1.5e-6 (kernels differ in
# summation order only). bf16: see docs/mismatch.md for the per-family measurements this sits above;
# a stale tied head measured errors up to 3.3 and a corrupted bucket > 0.5, far above both.
PROBE_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.25}


@dataclass
class ProbeCheck:
    """The engine's log-probs of its own probe responses against the learner's, token by token."""
    max_abs_diff: float
    num_tokens: int
    tolerance: float
    worst: dict        # where max_abs_diff is: engine, sample, position, token, engine / learner log-prob

    @property
    def ok(self) -> bool:
        return self.num_tokens > 0 and self.max_abs_diff <= self.tolerance   # NaN is not ok

    def summary(self) -> str:
        w = self.worst
        where = (f"; worst: engine {w['engine']}, probe sequence {w['sample']}, response position "
                 f"{w['position']}, token id {w['token']}: engine log-prob {w['engine_logprob']:.6g}, "
                 f"learner {w['learner_logprob']:.6g}") if w else ""
        return (f"probe of {self.num_tokens} tokens: max |engine - learner| log-prob = {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:g}){where}")


def compare_probe(rollouts: Sequence[Rollout], learner_logprobs: Sequence[Sequence[torch.Tensor]],
                  tolerance: float) -> ProbeCheck:
    """rollouts[e]: engine e's probe (RolloutEngine.probe); learner_logprobs[e][i]: the learner's log-probs
    of rollouts[e].samples[i]'s response tokens, [T_i]. The worst token over every engine decides."""
    worst, max_diff, n = {}, 0.0, 0
    for e, (rollout, pis) in enumerate(zip(rollouts, learner_logprobs, strict=True)):
        for i, (s, pi) in enumerate(zip(rollout.samples, pis, strict=True)):
            mu = s.rollout_logprobs
            if mu.shape != pi.shape:
                raise ValueError(f"probe sequence {i} of engine {e}: engine log-probs {tuple(mu.shape)} vs "
                                 f"learner {tuple(pi.shape)}")
            if not mu.numel():
                continue
            d = (mu.double() - pi.double().to(mu.device)).abs().nan_to_num(nan=float("inf"))
            j = int(d.argmax())
            n += mu.numel()
            if not worst or float(d[j]) > max_diff:
                max_diff = float(d[j])
                worst = {"engine": e, "sample": i, "position": j, "token": int(s.response_ids[j]),
                         "engine_logprob": float(mu[j]), "learner_logprob": float(pi[j])}
    return ProbeCheck(max_diff, n, float(tolerance), worst)
