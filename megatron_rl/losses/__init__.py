"""Trust-region policy losses for LLM RL: pure torch on local per-token tensors, no process group.

Spec: docs/algorithms.md Sec. 2-5 and 7. Everything works on the packed layout: flat [N] tensors plus
cu_seqlens [S+1]; padded [B, L] batches convert with `padded_to_packed` / `PolicyInputs.from_padded`.

    cfg = LossConfig(mode="cppo", divergence="topk_tv")          # validated here (ValueError names the field)
    inputs = PolicyInputs(logprobs=..., rollout_logprobs=..., advantages=..., loss_mask=..., cu_seqlens=...)
    counts = GlobalCounts(num_tokens=..., num_sequences=..., max_response_length=...)  # summed by the caller
    loss, metrics = compute_policy_loss(cfg, inputs, counts)

Reduction rule (loss and metrics): the caller passes GLOBAL counts (over DP / CP ranks and microbatches),
and every value returned is this microbatch's share of the global value:
- `loss` and every metric whose key does NOT end in `_max` is already divided by the global counts:
  SUM it over microbatches and ranks to get the global value (token metrics are means over loss tokens,
  `pg_loss` uses cfg.loss_agg_mode, `*_mean` of a per-sequence quantity is a mean over sequences).
- every metric whose key ends in `_max` is a local maximum: reduce it with MAX.

Registries (registry.py): LOSS_MODES (mode name -> ModeSpec: fn(cfg, batch) -> ModeResult and what the
mode needs), DIVERGENCES (name -> DivergenceSpec: fn(inputs, anchor_logprobs) -> Divergence, its inputs
and default delta), AGGREGATIONS (loss_agg_mode -> AggregationSpec: fn(batch) -> weights). `needs(cfg)`
(also `cfg.needs`) says what a configuration needs (top-K, full log-probs, context-parallel completions):
callers ask it instead of matching names. MODES, DIVERGENCE_NAMES and AGG_MODES are the registered names.
`cppo_mask` is the pure segmented-scan CPPO mask, usable on its own (e.g. by a context-parallel caller),
and `topk_buckets` the deduplicated top-K bucketing.
"""

from .config import LossConfig
from .cppo import CppoMask, cppo_mask, segment_quantile
from .divergence import (Divergence, TopKParts, binary_kl, binary_tv, exact_kl, exact_tv, topk_buckets, topk_kl,
                         topk_parts, topk_tv)
from .inputs import GlobalCounts, PolicyInputs, padded_to_packed, segment_ids, segment_sum
from .loss import compute_policy_loss, kl_to_reference
from .modes import ModeResult
from .reduce import Batch
from .registry import (AGGREGATIONS, DIVERGENCES, LOSS_MODES, AggregationSpec, DivergenceSpec, LossNeeds, ModeSpec,
                       needs)

# The registered names, in registration order (what LossConfig lists as allowed).
MODES = tuple(LOSS_MODES)
DIVERGENCE_NAMES = tuple(DIVERGENCES)
AGG_MODES = tuple(AGGREGATIONS)
DEFAULT_DELTA = {name: spec.default_delta for name, spec in DIVERGENCES.items()}

__all__ = [
    "AGGREGATIONS", "AGG_MODES", "AggregationSpec", "Batch", "CppoMask", "DEFAULT_DELTA", "DIVERGENCES",
    "DIVERGENCE_NAMES", "Divergence", "DivergenceSpec", "GlobalCounts", "LOSS_MODES", "LossConfig", "LossNeeds",
    "MODES", "ModeResult", "ModeSpec", "PolicyInputs", "TopKParts", "binary_kl", "binary_tv", "compute_policy_loss",
    "cppo_mask", "exact_kl", "exact_tv", "kl_to_reference", "needs", "padded_to_packed", "segment_ids",
    "segment_quantile", "segment_sum", "topk_buckets", "topk_kl", "topk_parts", "topk_tv",
]
