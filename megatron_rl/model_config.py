"""The one description of a dense decoder model (Llama / Qwen2 / Qwen3 / Mistral families).

Torch-free on purpose: the converter maps HF configs onto it, the megatron layer builds a GPTModel
from it, the planner estimates memory from it. Validated once, at construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int                     # the tokenizer's vocabulary (unpadded)
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int               # KV heads (GQA); == num_attention_heads for MHA
    head_dim: Optional[int] = None      # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None   # HF rope_scaling dict (e.g. llama3), or None
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False          # Qwen2
    qk_layernorm: bool = False          # Qwen3
    tie_word_embeddings: bool = False
    dtype: str = "float32"              # parameter dtype of the checkpoint
    make_vocab_size_divisible_by: int = 128
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific HF fields kept for export

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"model config: `{key}` {why}")

        if self.family not in FAMILIES:
            bad("family", f"is {self.family!r}; supported families: {', '.join(FAMILIES)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"is {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        for key in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                    "num_query_groups", "max_position_embeddings", "make_vocab_size_divisible_by"):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.num_attention_heads % self.num_query_groups:
            bad("num_query_groups", f"({self.num_query_groups}) must divide num_attention_heads "
                f"({self.num_attention_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                bad("head_dim", "must be given when num_attention_heads does not divide hidden_size")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.norm_epsilon <= 0:
            bad("norm_epsilon", f"must be > 0, got {self.norm_epsilon}")

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron's padding: round the vocabulary up to a multiple of divisible_by * tp.

        The padded rows are real parameters of the embedding / output layer; the losses must never
        give them probability (megatron_rl.parallel masks logits at ids >= vocab_size).
        """
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp: int = 1, pp: int = 1, vpp: int = 1) -> None:
        """Refuse a layout this model cannot be split into, naming the setting to change."""
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel layout: tensor_model_parallel_size={tp} and "
                             f"pipeline_model_parallel_size={pp} must be >= 1")
        if self.num_attention_heads % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide num_attention_heads="
                             f"{self.num_attention_heads}; choose a TP that divides it")
        if self.num_query_groups % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide num_query_groups (KV heads)="
                             f"{self.num_query_groups}; choose a TP that divides it")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide ffn_hidden_size="
                             f"{self.ffn_hidden_size}")
        if self.num_layers % (pp * vpp):
            raise ValueError(f"pipeline_model_parallel_size={pp} (x virtual {vpp}) does not divide "
                             f"num_layers={self.num_layers}; choose a PP that divides it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)
