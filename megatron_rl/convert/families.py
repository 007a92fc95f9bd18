"""The supported families and the two config directions: HF config.json <-> ModelConfig.

One small module per family (llama, qwen2, qwen3, mistral) holds its per-layer weight table and its
config traits; everything they share lives in hf_config.py and mapping.py.
"""

from __future__ import annotations

from typing import Optional

from megatron_rl.model_config import ModelConfig

from . import llama, mistral, qwen2, qwen3
from .hf_config import UnsupportedModelError, common_fields, common_hf_fields
from .mapping import Entry, TensorSource, entries, hf_shape, split_layer_name
from .safetensors_io import DTYPE_STR, CheckpointError

FAMILIES = {m.FAMILY: m for m in (llama, qwen2, qwen3, mistral)}
_BY_ARCH = {a: m for m in FAMILIES.values() for a in m.ARCHITECTURES}
_BY_TYPE = {m.MODEL_TYPE: m for m in FAMILIES.values()}
# Tensors some checkpoints carry that the model does not need (old Llama exports saved RoPE buffers).
_IGNORABLE = ("rotary_emb.inv_freq",)


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCH)


def family_of(hf: dict):
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    if not archs and hf.get("model_type") in _BY_TYPE:
        return _BY_TYPE[hf["model_type"]]
    raise UnsupportedModelError(
        f"architecture {archs or hf.get('model_type')!r} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}")


def to_model_config(hf: dict, dtype: str, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig of an HF config.json dict (refusing what Megatron's dense GPT cannot express)."""
    fam = family_of(hf)
    fields = common_fields(hf)
    fields.update({k: v for k, v in fam.traits(hf).items() if v is not None})
    return ModelConfig(family=fam.FAMILY, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                       **fields)


def to_hf_config(cfg: ModelConfig, source: Optional[dict] = None) -> dict:
    """config.json for `cfg`. With the source config.json kept at import, that is returned unchanged
    (the config round-trips exactly) after checking it still describes `cfg`."""
    if source is not None:
        again = to_model_config(source, cfg.dtype, cfg.make_vocab_size_divisible_by)
        if again != cfg:
            raise ValueError(f"the stored HF config describes {again}, the checkpoint holds {cfg}")
        return dict(source)
    fam = FAMILIES[cfg.family]
    return {"architectures": [fam.ARCHITECTURES[0]], "model_type": fam.MODEL_TYPE, **common_hf_fields(cfg),
            **fam.hf_fields(cfg)}


def model_entries(cfg: ModelConfig) -> list[Entry]:
    return entries(cfg, FAMILIES[cfg.family].LAYER)


# Every family's layer tensors by Megatron suffix. megatron.init draws models whose flags no one family
# has (the tests' Qwen2 with QK-norm) and must shard them by this mapping all the same.
_ANY_LAYER = {suffix: (kind, hf) for fam in FAMILIES.values() for suffix, kind, hf in fam.LAYER}


def entry_of(cfg: ModelConfig, mcore: str) -> Entry:
    """The entry of one global Megatron name, for a model of any flags (the families' layer tables
    together). The tied output layer is its own entry, made of the embedding."""
    layer = split_layer_name(mcore)
    if layer is None:
        found = [e for e in entries(cfg, ()) if e.mcore == mcore]   # embedding, final norm, output layer
        if found:
            return found[0]
    elif layer[1] in _ANY_LAYER:
        kind, hf = _ANY_LAYER[layer[1]]
        return Entry(mcore, kind, tuple(f"model.layers.{layer[0]}.{h}" for h in hf), layer[0])
    raise ValueError(f"no mapping for the Megatron tensor {mcore}")


def hf_tensor_specs(cfg: ModelConfig) -> list[tuple[str, list[int]]]:
    """Every HF tensor of `cfg`'s model with its shape, in HF order."""
    return [(name, hf_shape(cfg, name)) for e in model_entries(cfg) if e.export for name in e.hf]


def source_dtype(source) -> str:
    """The parameter dtype, from the tensors themselves (config.json's `torch_dtype` can be stale)."""
    dtypes = {source.dtype(n) for n in source.names if not n.endswith(_IGNORABLE)}
    names = sorted(DTYPE_STR.get(d, str(d)) for d in dtypes)
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_STR:
        raise UnsupportedModelError(f"{getattr(source, 'path', 'source')}: tensors must share one of "
                                    f"{sorted(DTYPE_STR.values())}; found {names}")
    return DTYPE_STR[next(iter(dtypes))]


def check_source(cfg: ModelConfig, source: TensorSource, names: list[str]) -> None:
    """Every tensor the model needs is there with its expected shape, and nothing that the model
    would silently drop is left over (e.g. biases a config forgot to declare)."""
    needed = {}
    for e in model_entries(cfg):
        for n in e.hf:
            needed[n] = hf_shape(cfg, n)
    missing = [n for n in needed if n not in names]
    if missing:
        raise CheckpointError(f"{getattr(source, 'path', 'source')}: missing tensors {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''} ({len(missing)} in all)")
    bad = [f"{n}: {source.shape(n)} (expected {s})" for n, s in needed.items() if list(source.shape(n)) != s]
    if bad:
        raise CheckpointError(f"{getattr(source, 'path', 'source')}: tensor shapes disagree with config.json: "
                              f"{bad[:4]}")
    extra = [n for n in names if n not in needed and not n.endswith(_IGNORABLE)
             and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        raise UnsupportedModelError(f"tensors the {cfg.family} mapping does not use (they would be dropped): "
                                    f"{extra[:6]}{' ...' if len(extra) > 6 else ''}")
