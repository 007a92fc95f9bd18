"""Layout-independent deterministic parameter init (tests, benchmarks, from-scratch runs).

Megatron's own init draws each stage's layers from one generator, so the same seed gives different
weights at PP=1 and PP=2. Here every parameter is drawn whole (in the TP=1 layout) from a generator
seeded by its GLOBAL name, then this rank's TP shard is cut out, so any (TP, PP) layout holds
exactly the same model.
"""

from __future__ import annotations

import re
import zlib

import torch

from megatron_rl.model_config import ModelConfig

from .model import layer_offset
from .parallel import ParallelState

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_name(name: str, cfg: ModelConfig, ps: ParallelState) -> str:
    name = name.removeprefix("module.").removeprefix("module.")
    m = _LAYER.match(name)
    if m:
        name = f"decoder.layers.{int(m.group(1)) + layer_offset(cfg, ps)}." + name[m.end():]
    # the transformer-engine spec fuses the pre-attention / pre-MLP norms into the next linear
    name = name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
    name = name.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
    return name


def _draw(shape, gen, kind: str, std: float) -> torch.Tensor:
    if kind == "norm":   # near 1, not exactly: a misplaced norm weight must show up in tests
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


def global_name(name: str, cfg: ModelConfig, ps: ParallelState) -> str:
    """A parameter's name in the full model (PP=1): global layer index, wrappers' prefixes removed."""
    return _global_name(name, cfg, ps)


def shard_of_full(name: str, param: torch.Tensor, full: torch.Tensor, cfg: ModelConfig,
                  ps: ParallelState) -> torch.Tensor:
    """This rank's part of `full` (the parameter `name` in the TP=1 layout) for the local `param`."""
    tp, r = ps.tp, ps.tp_rank
    gname = _global_name(name, cfg, ps)
    if gname in ("embedding.word_embeddings.weight", "output_layer.weight"):
        rows = cfg.padded_vocab_size(tp)
        padded = full.new_zeros(rows, full.shape[1])
        n = min(rows, full.shape[0], cfg.vocab_size)
        padded[:n] = full[:n]
        return padded.chunk(tp, dim=0)[r]
    if gname.endswith("mlp.linear_fc1.weight"):
        # gated MLP: each TP rank holds [gate_r; up_r], not a contiguous slice of [gate; up]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[r], up.chunk(tp, 0)[r]], dim=0)
    if getattr(param, "tensor_model_parallel", False):
        # fused QKV is grouped per KV head, so a contiguous slice is one rank's groups
        return full.chunk(tp, dim=param.partition_dim)[r]
    return full


def full_shape(name: str, param: torch.Tensor, cfg: ModelConfig, ps: ParallelState) -> tuple:
    gname = _global_name(name, cfg, ps)
    if gname in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return (cfg.vocab_size, cfg.hidden_size)
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) or gname.endswith("mlp.linear_fc1.weight"):
        shape[getattr(param, "partition_dim", 0)] *= ps.tp
    return tuple(shape)


@torch.no_grad()
def init_params_(model: torch.nn.Module, cfg: ModelConfig, ps: ParallelState, seed: int = 0,
                 std: float = 0.02) -> None:
    """Overwrite every parameter of `model` (one stage, any TP shard) deterministically."""
    for name, param in model.named_parameters():
        gname = _global_name(name, cfg, ps)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
        kind = "norm" if any("norm" in part for part in gname.split(".")[-2:]) else "dense"
        full = _draw(full_shape(name, param, cfg, ps), gen, kind, std)
        value = shard_of_full(name, param, full, cfg, ps)
        if tuple(value.shape) != tuple(param.shape):
            raise AssertionError(f"init of {name}: built {tuple(value.shape)}, parameter is {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))
