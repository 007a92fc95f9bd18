"""Rollout side: the vLLM engine, the rollout batch, bucketed weight sync (the only vllm importer).

`vllm` is imported lazily (engine construction, worker side), so `types`, `weight_sync`'s planner and
`mismatch` work without it.
"""

from megatron_rl.rollout.engine import EngineConfig, RolloutEngine, request_seed
from megatron_rl.rollout.mismatch import logprob_mismatch, logprobs_at, token_logprobs, topk_logprobs
from megatron_rl.rollout.types import Rollout, Sample
from megatron_rl.rollout.weight_sync import (WeightCheck, SyncStats, fused_group_key, plan_buckets,
                                             read_engine_weights, sync_weights, verify_weights)

__all__ = ["Rollout", "Sample", "WeightCheck", "SyncStats", "fused_group_key", "plan_buckets",
           "read_engine_weights", "sync_weights", "verify_weights", "logprob_mismatch", "logprobs_at", "token_logprobs",
           "topk_logprobs", "EngineConfig", "RolloutEngine", "request_seed"]

