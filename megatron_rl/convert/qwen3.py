"""Qwen3 dense (Qwen3ForCausalLM): Llama's layout plus QK-norm (RMSNorm over head_dim on q and k,
before RoPE), which Megatron's qk_layernorm matches. head_dim is explicit (128 by default, not
hidden_size / heads: Qwen3-0.6B has hidden 1024 with 16 heads of 128).
"""

from . import llama
from .hf_config import refuse, sliding_window_unused
from .mapping import REPLICATED

FAMILY = "qwen3"
ARCHITECTURES = ("Qwen3ForCausalLM",)
MODEL_TYPE = "qwen3"
LAYER = llama.LAYER + (
    ("self_attention.q_layernorm.weight", REPLICATED, ("self_attn.q_norm.weight",)),
    ("self_attention.k_layernorm.weight", REPLICATED, ("self_attn.k_norm.weight",)),
)


def traits(hf: dict) -> dict:
    refuse(hf.get("attention_bias"), "attention_bias=true (biases on q/k/v and o_proj) is not supported")
    refuse(not sliding_window_unused(hf, "use_sliding_window"),
           "use_sliding_window=true is not supported: Megatron's attention here is dense")
    return {"qk_layernorm": True, "head_dim": int(hf.get("head_dim") or 128)}


def hf_fields(cfg) -> dict:
    return {"attention_bias": False, "head_dim": cfg.head_dim, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": cfg.num_layers}
