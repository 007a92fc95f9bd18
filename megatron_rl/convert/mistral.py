"""Mistral dense (MistralForCausalLM): Llama's layout; only the attention window differs.

Mistral 7B v0.1 attends within a 4096-token sliding window: the dense Megatron attention cannot, so a
window shorter than max_position_embeddings is refused (v0.2+ and Nemo set sliding_window null).
"""

from . import llama
from .hf_config import refuse, sliding_window_unused

FAMILY = "mistral"
ARCHITECTURES = ("MistralForCausalLM",)
MODEL_TYPE = "mistral"
LAYER = llama.LAYER


def traits(hf: dict) -> dict:
    refuse(not sliding_window_unused(hf, None),
           f"sliding_window={hf.get('sliding_window')} (shorter than max_position_embeddings="
           f"{hf.get('max_position_embeddings')}) is not supported: Megatron's attention here is dense")
    return {"head_dim": hf.get("head_dim")}


def hf_fields(cfg) -> dict:
    return {"sliding_window": None, "head_dim": cfg.head_dim}
