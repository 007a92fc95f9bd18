"""Llama 2, 3, 3.1, 3.2, 3.3 (LlamaForCausalLM): the base layout the other families extend.

Llama 3.1+ use RoPE scaling of type llama3, carried in ModelConfig.rope_scaling; Llama 3.2 1B/3B tie
the embeddings. `attention_bias` in HF puts biases on q, k, v AND o_proj, `mlp_bias` on the MLP:
Megatron ties o_proj's bias to the MLP biases (add_bias_linear), so neither maps: refused (no
released Llama uses them).
"""

from .hf_config import refuse
from .mapping import GATE_UP, QKV, REPLICATED, ROW

FAMILY = "llama"
ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPE = "llama"

# (Megatron suffix under decoder.layers.{i}., kind, HF suffixes under model.layers.{i}.)
LAYER = (
    ("input_layernorm.weight", REPLICATED, ("input_layernorm.weight",)),
    ("self_attention.linear_qkv.weight", QKV,
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    ("self_attention.linear_proj.weight", ROW, ("self_attn.o_proj.weight",)),
    ("pre_mlp_layernorm.weight", REPLICATED, ("post_attention_layernorm.weight",)),
    ("mlp.linear_fc1.weight", GATE_UP, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    ("mlp.linear_fc2.weight", ROW, ("mlp.down_proj.weight",)),
)


def traits(hf: dict) -> dict:
    """ModelConfig fields particular to the family; refuses what Megatron cannot express."""
    refuse(hf.get("attention_bias"), "attention_bias=true (biases on q/k/v and o_proj) is not supported")
    refuse(hf.get("mlp_bias"), "mlp_bias=true is not supported")
    return {"head_dim": hf.get("head_dim")}


def hf_fields(cfg) -> dict:
    return {"attention_bias": False, "mlp_bias": False, "head_dim": cfg.head_dim, "pretraining_tp": 1}
