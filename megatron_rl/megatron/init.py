"""Layout-independent deterministic parameter init (tests, benchmarks, from-scratch runs).

Megatron's own init draws each stage's layers from one generator, so the same seed gives different
weights at PP=1 and PP=2. Here every parameter is drawn whole (in the TP=1 layout) from a generator
seeded by its GLOBAL name, then this rank's TP shard is cut out by the conversion's own mapping
(convert.mapping.shard_full), so any (TP, PP) layout holds exactly the same model.
"""

from __future__ import annotations

import zlib

import torch

from megatron_rl.convert import entry_of, full_shape, global_name, shard_full
from megatron_rl.model_config import ModelConfig

from .model import layer_offset
from .parallel import ParallelState


def canonical_name(name: str, cfg: ModelConfig, ps: ParallelState) -> str:
    """A local parameter's name at every (TP, PP) layout: its global name (convert.mapping.global_name at
    this stage's layer offset, wrappers' `module.` prefixes removed), with the last stage's copy of a
    tied embedding named as the embedding it copies, so that both draw (and compare as) the same values."""
    name = global_name(name.removeprefix("module.").removeprefix("module."), layer_offset(cfg, ps))
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        return "embedding.word_embeddings.weight"
    return name


def shard_of_full(name: str, full: torch.Tensor, cfg: ModelConfig, ps: ParallelState) -> torch.Tensor:
    """This rank's part of `full` (the local parameter `name`'s whole tensor, in the TP=1 layout)."""
    return shard_full(cfg, entry_of(cfg, canonical_name(name, cfg, ps)), full, ps.tp_rank, ps.tp)


def _draw(shape, gen, kind: str, std: float) -> torch.Tensor:
    if kind == "norm":   # near 1, not exactly: a misplaced norm weight must show up in tests
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


@torch.no_grad()
def init_params_(model: torch.nn.Module, cfg: ModelConfig, ps: ParallelState, seed: int = 0,
                 std: float = 0.02) -> None:
    """Overwrite every parameter of `model` (one stage, any TP shard) deterministically."""
    for name, param in model.named_parameters():
        gname = canonical_name(name, cfg, ps)
        entry = entry_of(cfg, gname)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
        kind = "norm" if any("norm" in part for part in gname.split(".")[-2:]) else "dense"
        full = _draw(full_shape(cfg, entry), gen, kind, std)
        value = shard_full(cfg, entry, full, ps.tp_rank, ps.tp)
        if tuple(value.shape) != tuple(param.shape):
            raise AssertionError(f"init of {name}: built {tuple(value.shape)}, parameter is {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))
