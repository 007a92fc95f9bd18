"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama's layout plus biases on q, k, v (not on o_proj).

Megatron's add_qkv_bias covers exactly that; the fused bias follows linear_qkv's interleaved layout.
The small models (0.5B-3B) tie the embeddings.
"""

from . import llama
from .hf_config import refuse, sliding_window_unused
from .mapping import QKV

FAMILY = "qwen2"
ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPE = "qwen2"
LAYER = llama.LAYER + (
    ("self_attention.linear_qkv.bias", QKV,
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
)


def traits(hf: dict) -> dict:
    refuse(not sliding_window_unused(hf, "use_sliding_window"),
           "use_sliding_window=true is not supported: Megatron's attention here is dense")
    return {"add_qkv_bias": True}


def hf_fields(cfg) -> dict:
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers}
