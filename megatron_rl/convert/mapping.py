"""Weight mapping between HF tensors and Megatron-core GPTModel tensors, one tensor at a time.

A family (llama.py, qwen2.py, ...) lists its per-layer tensors as (megatron suffix, kind, HF suffixes);
the kind says how the Megatron tensor is laid out relative to the HF one(s) and split over TP ranks:

  REPLICATED  norms: identical on every TP rank
  ROW         RowParallelLinear (attention out, MLP down): input columns (dim 1) split over TP
  VOCAB       embedding / output layer: rows split over TP, padded with zero rows to
              ModelConfig.padded_vocab_size(tp) (Megatron's padding; removed again on export)
  QKV         linear_qkv: q, k, v fused and interleaved per query group. For KV group g the rows are
              [q heads of g (heads_per_group * head_dim), k_g (head_dim), v_g (head_dim)]; HF orders q
              heads so that head j uses KV group j // heads_per_group, hence a TP rank's groups are
              contiguous row ranges of q_proj, k_proj and v_proj
  GATE_UP     linear_fc1 (SwiGLU): each TP rank holds [its gate rows; its up rows]

Names here are GLOBAL Megatron names (decoder.layers.{i} with i counted over the whole model, as in
dist-checkpoints); a pipeline stage's module uses local indices: add the stage's layer offset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch

from megatron_rl.model_config import ModelConfig

REPLICATED, ROW, VOCAB, QKV, GATE_UP = "replicated", "row", "vocab", "qkv", "gate_up"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Entry:
    mcore: str                 # global Megatron name
    kind: str
    hf: tuple[str, ...]        # HF tensor name(s) it is made of, in fused order
    layer: Optional[int]       # global layer index, None for embedding / final norm / output
    export: bool = True        # False for the tied output layer on the last PP stage (a copy)


class TensorSource(Protocol):
    """Where HF tensors come from: HFCheckpoint (lazy, from files) or an in-memory dict (tests)."""

    def shape(self, name: str) -> list[int]: ...

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None): ...


class DictSource:
    """A TensorSource over an in-memory {hf name: tensor} (tests, the weight-sync path, baselines)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name):
        return list(self.tensors[name].shape)

    def read(self, name, dim=None, start=0, stop=None):
        t = self.tensors[name]
        if dim is None:
            return t.clone()
        stop = t.shape[dim] if stop is None else stop
        return t.narrow(dim, start, stop - start).clone()


def entries(cfg: ModelConfig, layer_table: Sequence[tuple[str, str, tuple[str, ...]]]) -> list[Entry]:
    """Every Megatron tensor of the model in HF order (embedding, layers, final norm, output)."""
    out = [Entry("embedding.word_embeddings.weight", VOCAB, ("model.embed_tokens.weight",), None)]
    for i in range(cfg.num_layers):
        for suffix, kind, hf in layer_table:
            out.append(Entry(f"decoder.layers.{i}.{suffix}", kind,
                             tuple(f"model.layers.{i}.{h}" for h in hf), i))
    out.append(Entry("decoder.final_layernorm.weight", REPLICATED, ("model.norm.weight",), None))
    if cfg.tie_word_embeddings:
        # Megatron keeps a copy of the embedding on the last stage when PP > 1; filled from the
        # embedding, never exported (HF ties lm_head to embed_tokens).
        out.append(Entry("output_layer.weight", VOCAB, ("model.embed_tokens.weight",), None, export=False))
    else:
        out.append(Entry("output_layer.weight", VOCAB, ("lm_head.weight",), None))
    return out


def stage_of(cfg: ModelConfig, entry: Entry, pp: int) -> int:
    """The pipeline stage holding `entry` (Megatron splits layers evenly; embedding first, head last)."""
    if entry.layer is not None:
        return entry.layer // (cfg.num_layers // pp)
    return 0 if entry.mcore.startswith("embedding.") else pp - 1


# The transformer-engine layer spec fuses the pre-attention / pre-MLP norms into the following linear;
# the local spec keeps them separate (and maps them to the TE keys in its dist-checkpoint).
_TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def split_layer_name(name: str) -> Optional[tuple[int, str]]:
    """(layer index, suffix) of a decoder.layers.{i}.<suffix> name; None for the other tensors."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def global_name(local_name: str, layer_offset: int) -> str:
    """A stage module's parameter name (local or TE spec) -> the global name used here
    (decoder.layers.{local + offset}.<local-spec suffix>)."""
    layer = split_layer_name(local_name)
    if layer is None:
        return local_name
    i, suffix = layer
    return f"decoder.layers.{i + layer_offset}.{_TE_NAMES.get(suffix, suffix)}"


def hf_shape(cfg: ModelConfig, hf_name: str) -> list[int]:
    """The shape an HF tensor of this model must have (the same naming in all supported families)."""
    h, hd, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
    shapes = {"embed_tokens.weight": [v, h], "lm_head.weight": [v, h], "norm.weight": [h],
              "input_layernorm.weight": [h], "post_attention_layernorm.weight": [h],
              "self_attn.q_proj.weight": [q, h], "self_attn.k_proj.weight": [kv, h],
              "self_attn.v_proj.weight": [kv, h], "self_attn.q_proj.bias": [q],
              "self_attn.k_proj.bias": [kv], "self_attn.v_proj.bias": [kv], "self_attn.o_proj.weight": [h, q],
              "self_attn.q_norm.weight": [hd], "self_attn.k_norm.weight": [hd],
              "mlp.gate_proj.weight": [f, h], "mlp.up_proj.weight": [f, h], "mlp.down_proj.weight": [h, f]}
    key = re.sub(r"^(model\.)?(layers\.\d+\.)?", "", hf_name)
    return shapes[key]


# ---------------------------------------------------------------------------------------- HF -> Megatron

def to_megatron(cfg: ModelConfig, entry: Entry, source: TensorSource, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of `entry`, reading from `source` only the rows / columns it needs."""
    kind, hf = entry.kind, entry.hf
    if kind == REPLICATED:
        return source.read(hf[0])
    if kind == ROW:
        n = source.shape(hf[0])[1] // tp
        return source.read(hf[0], 1, tp_rank * n, (tp_rank + 1) * n)
    if kind == VOCAB:
        rows = cfg.padded_vocab_size(tp) // tp
        lo, hi = tp_rank * rows, (tp_rank + 1) * rows
        part = source.read(hf[0], 0, min(lo, cfg.vocab_size), min(hi, cfg.vocab_size))
        if part.shape[0] == rows:
            return part
        out = torch.zeros([rows] + list(part.shape[1:]), dtype=part.dtype)  # padding rows: zeros
        out[:part.shape[0]] = part
        return out
    if kind == QKV:
        hd, groups = cfg.head_dim, cfg.num_query_groups // tp
        per_group = cfg.num_attention_heads // cfg.num_query_groups
        g0 = tp_rank * groups
        q = source.read(hf[0], 0, g0 * per_group * hd, (g0 + groups) * per_group * hd)
        k = source.read(hf[1], 0, g0 * hd, (g0 + groups) * hd)
        v = source.read(hf[2], 0, g0 * hd, (g0 + groups) * hd)
        rest = list(q.shape[1:])
        fused = torch.cat([q.view(groups, per_group * hd, *rest), k.view(groups, hd, *rest),
                           v.view(groups, hd, *rest)], dim=1)
        return fused.reshape(-1, *rest)
    if kind == GATE_UP:
        n = cfg.ffn_hidden_size // tp
        return torch.cat([source.read(hf[0], 0, tp_rank * n, (tp_rank + 1) * n),
                          source.read(hf[1], 0, tp_rank * n, (tp_rank + 1) * n)], dim=0)
    raise ValueError(f"unknown tensor kind {kind!r} for {entry.mcore}")


# ---------------------------------------------------------------------------------------- Megatron -> HF

def to_hf(cfg: ModelConfig, entry: Entry, shards: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Full HF tensor(s) of `entry` from its TP shards, in TP rank order (one shard = TP 1 or
    replicated): QKV un-interleaved, gate/up split, vocabulary padding removed."""
    kind, hf = entry.kind, entry.hf
    if kind == REPLICATED:
        return [(hf[0], shards[0].contiguous())]
    if kind == ROW:
        return [(hf[0], torch.cat(list(shards), dim=1))]
    if kind == VOCAB:
        full = torch.cat(list(shards), dim=0)
        return [(hf[0], full[:cfg.vocab_size].contiguous())]
    if kind == QKV:
        hd = cfg.head_dim
        per_group = cfg.num_attention_heads // cfg.num_query_groups
        qs, ks, vs = [], [], []
        for s in shards:
            rest = list(s.shape[1:])
            grouped = s.reshape(-1, (per_group + 2) * hd, *rest)
            q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)
            qs.append(q.reshape(-1, *rest))
            ks.append(k.reshape(-1, *rest))
            vs.append(v.reshape(-1, *rest))
        return [(hf[0], torch.cat(qs)), (hf[1], torch.cat(ks)), (hf[2], torch.cat(vs))]
    if kind == GATE_UP:
        gates, ups = zip(*(torch.chunk(s, 2, dim=0) for s in shards))
        return [(hf[0], torch.cat(gates)), (hf[1], torch.cat(ups))]
    raise ValueError(f"unknown tensor kind {kind!r} for {entry.mcore}")


# ---------------------------------------------------------------------------------------- whole Megatron tensors

def full_shape(cfg: ModelConfig, entry: Entry) -> list[int]:
    """The shape of `entry`'s whole Megatron tensor (the TP = 1 layout, vocabulary unpadded): its HF
    tensors fused along dim 0."""
    shapes = [hf_shape(cfg, n) for n in entry.hf]
    return [sum(s[0] for s in shapes)] + shapes[0][1:]


def shard_full(cfg: ModelConfig, entry: Entry, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of `entry` cut from its whole Megatron tensor (the TP = 1 layout, vocabulary
    padded or not). It goes through the HF tensors `full` is made of, so the TP layout is written once,
    in to_megatron / to_hf."""
    return to_megatron(cfg, entry, DictSource(dict(to_hf(cfg, entry, [full]))), tp_rank, tp)


def tp_split_dim(entry: Entry) -> Optional[int]:
    """The dim along which `entry`'s TP shards concatenate (None: replicated)."""
    return {REPLICATED: None, ROW: 1}.get(entry.kind, 0)

