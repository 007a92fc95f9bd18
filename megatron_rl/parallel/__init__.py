"""Tensor-parallel (vocabulary-sharded) per-token quantities and the whole policy loss on a logits shard.

Imports torch, torch.distributed, megatron_rl.losses and megatron_rl.utils only; process groups and the
shard's vocabulary range are always explicit arguments (no global parallel state). The primitives
(vocab_parallel.py) need torch alone; the whole loss (loss.py, which needs megatron_rl.losses) is loaded
on first use, so `import megatron_rl.parallel` never depends on the losses package importing.
"""

from megatron_rl.parallel.vocab_parallel import (
    TokenStats,
    VocabShard,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_at,
    vocab_parallel_token_stats,
    vocab_parallel_topk,
)

_LAZY = {"POLICY_FIELDS", "ROLLOUT_FIELDS", "vocab_parallel_policy_loss"}


def __getattr__(name):   # PEP 562: the loss-level names, imported when first asked for
    if name in _LAZY:
        from megatron_rl.parallel import loss

        return getattr(loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "POLICY_FIELDS",
    "ROLLOUT_FIELDS",
    "TokenStats",
    "VocabShard",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
    "vocab_parallel_logprobs_at",
    "vocab_parallel_policy_loss",
    "vocab_parallel_token_stats",
    "vocab_parallel_topk",
]
