"""Trust-region policy losses for LLM RL: pure torch on local per-token tensors, no process group.

Spec: docs/algorithms.md (Sec. 2-5 and 7). Everything works on the packed layout: flat [N] tensors plus
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

Registries: LOSS_MODES (mode name -> fn(cfg, batch) -> ModeResult), DIVERGENCES (divergence name ->
fn(inputs, anchor_logprobs) -> Divergence). `cppo_mask` is the pure segmented-scan CPPO mask, usable on its
own (e.g. by a context-parallel caller), and `topk_buckets` the deduplicated top-K bucketing.
"""

from .config import AGG_MODES, DEFAULT_DELTA, DIVERGENCE_NAMES, MODES, LossConfig
from .cppo import CppoMask, cppo_mask, segment_quantile
from .divergence import (DIVERGENCES, Divergence, TopKParts, binary_kl, binary_tv, exact_kl, exact_tv, topk_buckets,
                         topk_kl, topk_parts, topk_tv)
from .inputs import GlobalCounts, PolicyInputs, padded_to_packed, segment_ids, segment_sum
from .loss import compute_policy_loss, kl_to_reference
from .modes import LOSS_MODES, ModeResult
from .reduce import Batch

assert set(LOSS_MODES) == set(MODES), "every mode named in config.MODES must be registered in modes.py"
assert set(DIVERGENCES) == set(DIVERGENCE_NAMES)

__all__ = [
    "AGG_MODES", "Batch", "CppoMask", "DEFAULT_DELTA", "DIVERGENCES", "DIVERGENCE_NAMES", "Divergence",
    "GlobalCounts", "LOSS_MODES", "LossConfig", "MODES", "ModeResult", "PolicyInputs", "TopKParts", "binary_kl",
    "binary_tv", "compute_policy_loss", "cppo_mask", "exact_kl", "exact_tv", "kl_to_reference", "padded_to_packed",
    "segment_ids", "segment_quantile", "segment_sum", "topk_buckets", "topk_kl", "topk_parts", "topk_tv",
]
