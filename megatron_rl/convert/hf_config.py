"""Config mapping shared by the families: HF config.json (a plain dict) <-> ModelConfig.

config.json is read as JSON, not through transformers, so conversion needs no transformers import and
accepts both spellings of RoPE: transformers 4.x (`rope_theta`, `rope_scaling`; what Llama 3.x and
Qwen2.5 on the hub carry) and 5.x (`rope_parameters` holding rope_theta and the scaling fields).
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_rl.model_config import ModelConfig

# RoPE variants megatron_rl.megatron.model.rope_inv_freq reproduces exactly (HF semantics). Megatron-core's
# own switches cannot express the others (yarn's attention scaling, dynamic NTK's length-dependent
# frequencies, longrope's per-dim factors), so those are refused rather than silently approximated.
SUPPORTED_ROPE = {"default": (), "linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


class UnsupportedModelError(ValueError):
    """The HF model uses something the Megatron model cannot express (the message names it)."""


def refuse(cond: Any, what: str) -> None:
    if cond:
        raise UnsupportedModelError(what)


def read_rope(hf: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, normalised rope_scaling dict with `rope_type`, or None for plain RoPE)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):  # per layer type: only one kind allowed
            kinds = list(params.values())
            refuse(any(k != kinds[0] for k in kinds), f"different RoPE per layer type: {params}")
            params = kinds[0]
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    refuse(kind not in SUPPORTED_ROPE, f"RoPE type {kind!r} is not supported; supported: "
           f"{', '.join(SUPPORTED_ROPE)} (Megatron's rotary embedding cannot express {kind!r} exactly)")
    missing = [k for k in SUPPORTED_ROPE[kind] if k not in scaling]
    refuse(missing, f"RoPE type {kind!r} lacks {missing} in the config")
    partial = hf.get("partial_rotary_factor", scaling.pop("partial_rotary_factor", 1.0))
    refuse(float(partial) != 1.0, f"partial_rotary_factor={partial} is not supported (only 1.0)")
    if kind == "default":
        return float(theta), None
    return float(theta), {"rope_type": kind, **{k: scaling[k] for k in SUPPORTED_ROPE[kind]}}


def common_fields(hf: dict) -> dict:
    """The ModelConfig fields every supported family spells the same way in config.json."""
    need = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [k for k in need if hf.get(k) is None]
    refuse(missing, f"config.json lacks {missing}")
    act = hf.get("hidden_act", "silu")
    refuse(act != "silu", f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
    theta, scaling = read_rope(hf)
    return dict(vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
                ffn_hidden_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=int(hf["num_attention_heads"]),
                num_query_groups=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                rope_theta=theta, rope_scaling=scaling, norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def common_hf_fields(cfg: ModelConfig) -> dict:
    """config.json fields from a ModelConfig, written the transformers 4.x way (5.x reads it too)."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_query_groups,
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
            "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
            "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
            "torch_dtype": cfg.dtype, "dtype": cfg.dtype, "attention_dropout": 0.0, "use_cache": True}


def sliding_window_unused(hf: dict, flag: Optional[str]) -> bool:
    """True when sliding-window attention cannot change the result: switched off by `flag`
    (Qwen's use_sliding_window), absent, or a window no shorter than the longest context."""
    window = hf.get("sliding_window")
    if flag is not None and not hf.get(flag, False):
        return True
    return window is None or int(window) >= int(hf.get("max_position_embeddings", 0))
