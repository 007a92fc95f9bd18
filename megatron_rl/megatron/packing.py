"""Sequence packing: whole sequences into fixed-size microbatch rows by a token budget (THD layout).

A sample is one sequence (prompt + response), a `TrainingSample`: per-token tensors aligned with `tokens`
(value i belongs to token i), each named once for what it is (`rollout_*` mu's, `old_*` pi_old's, `ref_*`
the reference's, the names PolicyInputs uses). Every field present travels with the tokens. Packing shifts them by one so that
row position j (whose logits predict token j + 1 of its segment) holds the values of token j + 1; the
last position of each segment and the padding tail get zeros (so a loss_mask there is 0).

Every microbatch is one row of exactly `microbatch_tokens` positions (pipeline shapes stay static);
`cu_seqlens` marks the real segments. A sequence is never split across microbatches, and a sequence
longer than the budget is a start-up error naming `microbatch_tokens`.

Attention: the transformer-engine layer spec takes THD `packed_seq_params` (cu_seqlens). The local spec
(CPU, or a GPU without transformer-engine) only takes an explicit boolean mask, so `attention_mask` is
block-diagonal causal [1, 1, S, S] (True = masked; `causal_block_mask`, which the Actor builds on the
model's device per forward; `cpu_attention_mask=True` also attaches one here) and positions run on across
segments: RoPE depends on relative positions
only, so this equals running each sequence alone (tests/megatron checks packed == unpacked logits).

Devices: a microbatch is built on its samples' device (the host for rollouts: the Actor then moves the
whole row to the model's device in one go), never on an implicit default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class TrainingSample:
    """One sequence for training: the one record from the rollout batch to the loss's PolicyInputs.

    Per token, aligned with `tokens` [L] (value i belongs to token i; the prompt's positions hold finite
    placeholders, never read: loss_mask is 0 there). Only `tokens` is needed to pack; the policy loss
    needs loss_mask, advantages and rollout_logprobs, and the fields its mode asks for.
    """

    tokens: torch.Tensor                                 # [L] int64, prompt + response
    loss_mask: Optional[torch.Tensor] = None             # [L] 0/1: 1 on generated response tokens
    advantages: Optional[torch.Tensor] = None            # [L] float32, the sequence's advantage
    rollout_logprobs: Optional[torch.Tensor] = None      # [L] float32, mu(a_t) as the engine sampled it
    rollout_topk_ids: Optional[torch.Tensor] = None      # [L, K] int64, mu's top-K ids (top-K divergences)
    rollout_topk_logprobs: Optional[torch.Tensor] = None  # [L, K] float32, mu's log-probs at them
    old_logprobs: Optional[torch.Tensor] = None          # [L] float32, pi_old(a_t) (anchor 'old')
    ref_logprobs: Optional[torch.Tensor] = None          # [L] float32, the reference's (KL term)

    def __post_init__(self):
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.dim() != 1:
            raise ValueError(f"TrainingSample.tokens: expected a tensor [L], got "
                             f"{tuple(getattr(self.tokens, 'shape', ())) or type(self.tokens).__name__}")
        n = self.tokens.shape[0]
        for name, value in self.per_token().items():
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != n:
                raise ValueError(f"TrainingSample.{name}: expected a tensor [{n}, ...] aligned with tokens, got "
                                 f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    def per_token(self) -> dict[str, torch.Tensor]:
        """The fields present, other than tokens, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "tokens" and getattr(self, f.name) is not None}


@dataclass
class Microbatch:
    tokens: torch.Tensor                  # [1, S] int64 (padding: 0)
    labels: torch.Tensor                  # [1, S] int64: the token each position predicts (0 where none)
    position_ids: torch.Tensor            # [1, S] int64
    cu_seqlens: torch.Tensor              # [n + 1] int32, segment boundaries in the row (real segments)
    seq_ids: torch.Tensor                 # [n] int64: index of each segment's sample in the batch
    fields: dict = field(default_factory=dict)   # name -> [1, S, ...] shifted per-token values
    attention_mask: Optional[torch.Tensor] = None  # [1, 1, S, S] bool, the local spec only
    # context parallel (split_for_cp): this CP rank's positions of the row and its chunk-level segments
    cp_index: Optional[torch.Tensor] = None
    cp_local_cu: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def to(self, device) -> "Microbatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Microbatch(tokens=move(self.tokens), labels=move(self.labels), position_ids=move(self.position_ids),
                          cu_seqlens=move(self.cu_seqlens), seq_ids=self.seq_ids,
                          fields={k: move(v) for k, v in self.fields.items()},
                          attention_mask=move(self.attention_mask), cp_index=self.cp_index,
                          cp_local_cu=move(self.cp_local_cu))


def row_cu_seqlens(mb: Microbatch) -> torch.Tensor:
    """[n + 2] int64 boundaries covering all S positions of the row: the real segments plus the padding
    tail as one more (loss-free) segment, on cu_seqlens' device; a CP split's cu_seqlens already cover its
    row and are returned as they are. The tail is appended even when it is empty (a full row): deciding
    would read cu_seqlens[-1], a device sync per microbatch on an accelerator, and an empty segment holds
    no token, so neither attention nor the loss changes."""
    cu = mb.cu_seqlens.to(torch.int64)
    if mb.cp_index is not None:
        return cu
    return torch.cat([cu, torch.full((1,), mb.num_tokens, dtype=torch.int64, device=cu.device)])


def check_budget(lengths: Sequence[int], microbatch_tokens: int, pad_multiple: int = 1) -> None:
    """Refuse a budget some sequence cannot fit in (start-up check; names the setting)."""
    if microbatch_tokens < 1:
        raise ValueError(f"microbatch_tokens={microbatch_tokens} must be >= 1")
    longest = max((_padded(n, pad_multiple) for n in lengths), default=0)
    if longest > microbatch_tokens:
        raise ValueError(f"microbatch_tokens={microbatch_tokens} is smaller than the longest sequence "
                         f"({longest} tokens{' after CP padding' if pad_multiple > 1 else ''}); a sequence "
                         f"is never split across microbatches: raise microbatch_tokens to >= {longest}")


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_microbatches(lengths: Sequence[int], microbatch_tokens: int, num_microbatches: Optional[int] = None,
                      pad_multiple: int = 1) -> list[list[int]]:
    """Assign sequences (by index) to microbatches, each within the budget; deterministic.

    num_microbatches=None: first fit in the given order, opening a microbatch when none fits.
    num_microbatches=m: exactly m microbatches, longest sequence first into the least-filled one that
    fits (balanced work per microbatch); ValueError if they do not fit.
    """
    check_budget(lengths, microbatch_tokens, pad_multiple)
    sizes = [_padded(n, pad_multiple) for n in lengths]
    if num_microbatches is None:
        bins: list[list[int]] = []
        fill: list[int] = []
        for i, n in enumerate(sizes):
            for b in range(len(bins)):
                if fill[b] + n <= microbatch_tokens:
                    bins[b].append(i)
                    fill[b] += n
                    break
            else:
                bins.append([i])
                fill.append(n)
        return bins or [[]]
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
    bins = [[] for _ in range(num_microbatches)]
    fill = [0] * num_microbatches
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        order = sorted(range(num_microbatches), key=lambda b: (fill[b], b))
        b = next((b for b in order if fill[b] + sizes[i] <= microbatch_tokens), None)
        if b is None:
            raise ValueError(f"{len(sizes)} sequences ({sum(sizes)} tokens) do not fit in "
                             f"num_microbatches={num_microbatches} x microbatch_tokens={microbatch_tokens}")
        bins[b].append(i)
        fill[b] += sizes[i]
    return [sorted(b) for b in bins]


def causal_block_mask(cu_seqlens: torch.Tensor, total: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """[1, 1, S, S] bool, True = masked: causal inside each segment; the padding tail is one more segment.

    Built on `device` (default: cu_seqlens'). The segment ids [S] are made on the host from the boundaries
    (host cu_seqlens: no device sync) and only the [S, S] comparison runs on `device`, so a GPU builds the
    S^2 mask itself instead of receiving it over PCIe."""
    dev = cu_seqlens.device if device is None else torch.device(device)
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])] + [total - bounds[-1]]
    # padding attends within itself (segment len(bounds) - 1), so no row is fully masked
    seg = torch.repeat_interleave(torch.arange(len(lengths), device="cpu"), torch.tensor(lengths, device="cpu"))
    seg = seg.to(dev)
    pos = torch.arange(total, device=dev)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


def pack(samples: Sequence[TrainingSample], indices: Sequence[int], microbatch_tokens: int, *,
         cpu_attention_mask: bool = True, pad_multiple: int = 1) -> Microbatch:
    """One microbatch row from samples[indices] (whole sequences, in order)."""
    S = microbatch_tokens
    dev = samples[indices[0]].tokens.device if len(indices) else torch.device("cpu")
    tokens = torch.zeros(S, dtype=torch.int64, device=dev)
    labels = torch.zeros(S, dtype=torch.int64, device=dev)
    present = [samples[i].per_token() for i in indices]
    names = sorted({k for p in present for k in p})
    fields: dict[str, torch.Tensor] = {}
    bounds = [0]
    for i, per_token in zip(indices, present):
        s = samples[i]
        L = s.length
        a = bounds[-1]
        if a + _padded(L, pad_multiple) > S:
            raise ValueError(f"microbatch_tokens={S}: sequences {list(indices)} do not fit one row")
        tokens[a:a + L] = s.tokens
        labels[a:a + L - 1] = s.tokens[1:]
        for k in names:
            v = per_token.get(k)
            if v is None:
                raise ValueError(f"sample {i} lacks field {k!r} that other samples of the batch carry")
            if k not in fields:
                fields[k] = torch.zeros((S,) + tuple(v.shape[1:]), dtype=v.dtype, device=dev)
            fields[k][a:a + L - 1] = v[1:]   # position j holds the values of token j + 1 (its target)
        bounds.append(a + _padded(L, pad_multiple))
    cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
    return Microbatch(
        tokens=tokens[None], labels=labels[None], position_ids=torch.arange(S, device=dev)[None], cu_seqlens=cu,
        seq_ids=torch.tensor(list(indices), dtype=torch.int64, device="cpu"),   # host bookkeeping
        fields={k: v[None] for k, v in fields.items()},
        attention_mask=causal_block_mask(cu, S) if cpu_attention_mask else None)


def pack_batch(samples: Sequence[TrainingSample], microbatch_tokens: int, num_microbatches: Optional[int] = None,
               *, cpu_attention_mask: bool = True, pad_multiple: int = 1) -> list[Microbatch]:
    """All of `samples` into microbatches (see plan_microbatches)."""
    plan = plan_microbatches([s.length for s in samples], microbatch_tokens,
                             num_microbatches, pad_multiple)
    return [pack(samples, idx, microbatch_tokens, cpu_attention_mask=cpu_attention_mask,
                 pad_multiple=pad_multiple) for idx in plan]


def split_for_cp(mb: Microbatch, cp: int, cp_rank: int) -> Microbatch:
    """This CP rank's part of a microbatch in Megatron's load-balanced order (2 * cp chunks per segment,
    the padding tail included as one more segment); cu_seqlens become those of the whole row including
    the tail (what THD attention with CP takes), the loss uses `cp_local_cu`. Needs pad_multiple = 2 * cp packing."""
    from megatron_rl.parallel.context_parallel import partition_index

    cu = row_cu_seqlens(mb)
    index, local_cu = partition_index(cu, cp, cp_rank)
    return Microbatch(tokens=mb.tokens[:, index], labels=mb.labels[:, index],
                      position_ids=mb.position_ids[:, index], cu_seqlens=cu.to(torch.int32), seq_ids=mb.seq_ids,
                      fields={k: v[:, index] for k, v in mb.fields.items()}, attention_mask=None,
                      cp_index=index, cp_local_cu=local_cu)
