"""Inputs of the loss: local per-token tensors in the packed layout, the caller's global counts, and the
vectorised segment helpers everything else builds on.

Packed layout: flat [N] per-token tensors; `cu_seqlens` [S+1] (int, cu_seqlens[0] = 0, cu_seqlens[-1] = N)
splits them into S segments (one sequence each: prompt + response, or a response only). Padded [B, L]
batches convert with `padded_to_packed` / `PolicyInputs.from_padded`: B segments of length L, the padding
masked by loss_mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass
from typing import Optional, Union

import torch

Number = Union[int, float, torch.Tensor]

_PER_TOKEN = ("logprobs", "rollout_logprobs", "old_logprobs", "advantages", "loss_mask", "tokens",
              "ref_logprobs", "entropy")
_FLOATS = ("logprobs", "rollout_logprobs", "old_logprobs", "advantages", "ref_logprobs", "entropy",
           "topk_logprobs", "anchor_topk_logprobs", "full_logprobs", "anchor_full_logprobs",
           "seg_prefix_z", "seg_delta_b", "seg_log_ratio_sum")
_PER_SEGMENT = ("seg_num_tokens", "seg_tokens_before", "seg_prefix_z", "seg_delta_b", "seg_log_ratio_sum")


@dataclass(frozen=True, eq=False)
class PolicyInputs:
    """Local per-token tensors of one microbatch (N tokens, S segments), validated at construction.

    Per token, [N]: `logprobs` (log pi of the sampled token; carries grad), `rollout_logprobs` (mu),
    `old_logprobs` (pi_old; needed when anchor='old'), `advantages`, `loss_mask` (bool or 0/1; 1 on
    generated response tokens), `tokens` (sampled ids; needed by top-K to deduplicate), `ref_logprobs`
    (KL-to-reference), `entropy` (with grad; bonus + metric).
    Top-K, [N, K]: `topk_ids` (the anchor's top-K ids: mu's with anchor='rollout'), `anchor_topk_logprobs`
    (the anchor's log-probs at topk_ids), `topk_logprobs` (pi's log-probs at topk_ids). The sampled token
    is added from `logprobs` and the anchor's sampled-token log-prob; ids are deduplicated.
    `topk_ids_source`: 'rollout' (vLLM's top-K of mu) or 'old' (the trainer's top-K of pi_old); logged.
    Exact, [N, V]: `full_logprobs` (pi), `anchor_full_logprobs` (the anchor).
    `cu_seqlens` [S+1]: segment boundaries; None = one segment of N tokens.

    Per segment, [S], all optional: what a context-parallel caller supplies when a sequence is split
    across ranks (None = computed locally, exact when every segment is whole on this rank):
      seg_num_tokens     loss tokens of the WHOLE sequence (seq-mean-token-mean, CPPO horizon 'sequence',
                         GSPO's length normalisation, per-sequence metric weights)
      seg_tokens_before  loss tokens of the sequence that precede this segment (CPPO position offset)
      seg_prefix_z       CPPO: sum of w_j * D_j over those preceding tokens (exclusive scan across ranks;
                         `cppo_mask(...).z_sum` gives each chunk's share)
      seg_delta_b        CPPO: delta_b of the whole sequence (p90 needs every D of the sequence)
      seg_log_ratio_sum  GSPO: sum of m_t * (logprobs - anchor) over the whole sequence (detached)

    Validation at construction: structure always (names, shapes, dtypes); values (finite floats, a 0/1
    mask, cu_seqlens covering N) unless `check_values=False`. The value checks are one host sync; skipping
    them is for inputs already checked, and for fake-tensor tests of the math (a fake tensor has no values).
    """

    logprobs: torch.Tensor
    rollout_logprobs: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    anchor_topk_logprobs: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    topk_ids_source: str = "rollout"
    full_logprobs: Optional[torch.Tensor] = None
    anchor_full_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    seg_num_tokens: Optional[torch.Tensor] = None
    seg_tokens_before: Optional[torch.Tensor] = None
    seg_prefix_z: Optional[torch.Tensor] = None
    seg_delta_b: Optional[torch.Tensor] = None
    seg_log_ratio_sum: Optional[torch.Tensor] = None
    check_values: InitVar[bool] = True

    def __post_init__(self, check_values: bool):
        _validate(self, check_values)
        object.__setattr__(self, "_values_checked", bool(check_values))

    @property
    def values_checked(self) -> bool:
        """Whether construction verified the values (losses skip their own host-side value checks if not)."""
        return self._values_checked

    @property
    def num_tokens(self) -> int:
        return self.logprobs.shape[0]

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def mask(self) -> torch.Tensor:
        """loss_mask as bool [N] (never written to)."""
        lm = self.loss_mask
        return lm if lm.dtype == torch.bool else lm != 0

    def anchor_logprobs(self, anchor: str) -> torch.Tensor:
        if anchor == "rollout":
            return self.rollout_logprobs
        if self.old_logprobs is None:
            raise ValueError("PolicyInputs.old_logprobs: required when LossConfig.anchor='old'")
        return self.old_logprobs

    @classmethod
    def from_padded(cls, **kwargs) -> "PolicyInputs":
        """Build from padded [B, L] (and [B, L, K] / [B, L, V]) tensors; see `padded_to_packed`."""
        return cls(**padded_to_packed(**kwargs))


def padded_to_packed(**tensors) -> dict:
    """Flatten padded tensors [B, L, ...] to the packed layout: [B*L, ...] plus cu_seqlens = (0, L, .., B*L).

    Every tensor named like a PolicyInputs per-token / top-K / full field is reshaped; per-segment `seg_*`
    fields ([B]) and non-tensors pass through. Padding stays in place, masked by loss_mask.
    """
    if "loss_mask" not in tensors or tensors["loss_mask"].dim() != 2:
        raise ValueError("padded_to_packed: loss_mask must be given with shape [B, L]")
    b, l = tensors["loss_mask"].shape
    out = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and not name.startswith("seg_") and name != "cu_seqlens":
            if tuple(value.shape[:2]) != (b, l):
                raise ValueError(f"padded_to_packed: {name} has shape {tuple(value.shape)}; expected [{b}, {l}, ...]")
            value = value.reshape(b * l, *value.shape[2:])
        out[name] = value
    out["cu_seqlens"] = torch.arange(0, b * l + 1, max(l, 1), device=tensors["loss_mask"].device)[: b + 1]
    return out


@dataclass(frozen=True)
class GlobalCounts:
    """Counts summed by the caller over DP / CP ranks and microbatches (algorithms.md Sec. 5).

    num_tokens: loss tokens (m_t = 1) in the global batch. num_sequences: responses in the global batch
    (the caller decides whether fully masked ones count; verl excludes them). max_response_length: L of
    `seq-mean-token-sum-norm` and of CPPO horizon 'max'. Ints or 0-d tensors (e.g. after an all-reduce).
    """

    num_tokens: Number
    num_sequences: Number
    max_response_length: Optional[int] = None

    def __post_init__(self):
        for name in ("num_tokens", "num_sequences"):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor) and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"GlobalCounts.{name}: got {v!r}; allowed: a number >= 0 or a 0-d tensor")
        m = self.max_response_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"GlobalCounts.max_response_length: got {m!r}; allowed: an int >= 1 or None")

    @classmethod
    def local(cls, inputs: PolicyInputs, max_response_length: Optional[int] = None) -> "GlobalCounts":
        """Counts of this batch alone (single process, one microbatch); sequences = segments with a loss token."""
        seg_tokens = segment_sum(inputs.mask.to(torch.int64), segment_ids(inputs.cu_seqlens, inputs.num_tokens),
                                 inputs.num_segments)
        return cls(int(seg_tokens.sum()), int((seg_tokens > 0).sum()), max_response_length)


# ---- vectorised segment helpers (no Python loop over tokens or segments) -----------------------------------

def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """[N] int64: the segment of each token."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                   output_size=n)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[S]: sum of values [N] per segment."""
    return torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add(0, seg, values)


# ---- validation ------------------------------------------------------------------------------------------

def _validate(inp: PolicyInputs, check_values: bool = True) -> None:
    def err(name, msg):
        raise ValueError(f"PolicyInputs.{name}: {msg}")

    for name in ("logprobs", "rollout_logprobs", "advantages", "loss_mask"):
        if not isinstance(getattr(inp, name), torch.Tensor):
            err(name, f"required tensor, got {type(getattr(inp, name)).__name__}")
    for f in dataclasses.fields(inp):
        v = getattr(inp, f.name)
        if v is not None and f.name != "topk_ids_source" and not isinstance(v, torch.Tensor):
            err(f.name, f"expected a tensor or None, got {type(v).__name__}")
    if inp.logprobs.dim() != 1:
        err("logprobs", f"expected shape [N], got {tuple(inp.logprobs.shape)} (use PolicyInputs.from_padded)")
    n = inp.logprobs.shape[0]
    for name in _PER_TOKEN:
        v = getattr(inp, name)
        if v is not None and tuple(v.shape) != (n,):
            err(name, f"expected shape [{n}] like logprobs, got {tuple(v.shape)}")
    for name in _FLOATS:
        v = getattr(inp, name)
        if v is not None and not v.is_floating_point():
            err(name, f"expected a floating-point tensor, got {v.dtype}")
    if inp.topk_ids_source not in ("rollout", "old"):
        err("topk_ids_source", f"got {inp.topk_ids_source!r}; allowed: 'rollout', 'old'")

    # cu_seqlens: 1-D ints, starts at 0, ends at N, non-decreasing (empty segments allowed).
    if inp.cu_seqlens is None:
        object.__setattr__(inp, "cu_seqlens", torch.tensor([0, n], device=inp.logprobs.device))
    cu = inp.cu_seqlens
    if cu.dim() != 1 or cu.shape[0] < 1 or cu.is_floating_point() or cu.dtype == torch.bool:
        err("cu_seqlens", f"expected a 1-D integer tensor [S+1], got {cu.dtype} {tuple(cu.shape)}")
    s = cu.shape[0] - 1
    for name in _PER_SEGMENT:
        v = getattr(inp, name)
        if v is not None and tuple(v.shape) != (s,):
            err(name, f"expected shape [{s}] (one per segment of cu_seqlens), got {tuple(v.shape)}")

    # top-K: ids [N, K] integer, the two log-prob tensors [N, K] with the same K, tokens needed to dedup.
    topk = [(k, getattr(inp, k)) for k in ("topk_ids", "anchor_topk_logprobs", "topk_logprobs")]
    given = [k for k, v in topk if v is not None]
    if given and len(given) != 3:
        missing = [k for k, v in topk if v is None]
        err(missing[0], f"required together with {', '.join(given)} (top-K needs ids and both log-prob sets)")
    if given:
        ids = inp.topk_ids
        if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 1:
            err("topk_ids", f"expected shape [{n}, K] with K >= 1, got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            err("topk_ids", f"expected an integer tensor, got {ids.dtype}")
        for name in ("anchor_topk_logprobs", "topk_logprobs"):
            if tuple(getattr(inp, name).shape) != tuple(ids.shape):
                err(name, f"K disagrees with topk_ids: expected {tuple(ids.shape)}, got "
                          f"{tuple(getattr(inp, name).shape)}")
        if inp.tokens is None:
            err("tokens", "required with topk_ids (the sampled token joins the top-K buckets, deduplicated)")
    full = [(k, getattr(inp, k)) for k in ("full_logprobs", "anchor_full_logprobs")]
    if sum(v is not None for _, v in full) == 1:
        err([k for k, v in full if v is None][0], "required together with the other full-vocabulary log-probs")
    if inp.full_logprobs is not None:
        f, a = inp.full_logprobs, inp.anchor_full_logprobs
        if f.dim() != 2 or f.shape[0] != n:
            err("full_logprobs", f"expected shape [{n}, V], got {tuple(f.shape)}")
        if tuple(a.shape) != tuple(f.shape):
            err("anchor_full_logprobs", f"expected {tuple(f.shape)} like full_logprobs, got {tuple(a.shape)}")

    # Value checks, batched into one host sync: finiteness, 0/1 mask, cu_seqlens coverage.
    if not check_values:
        return
    checks, names = [], []
    for name in _FLOATS:
        v = getattr(inp, name)
        if v is not None and name not in ("seg_delta_b",):
            checks.append(torch.isfinite(v.detach()).all())
            names.append((name, "contains NaN or inf"))
    if inp.seg_delta_b is not None:
        checks.append(((inp.seg_delta_b >= 0) & ~torch.isnan(inp.seg_delta_b)).all())
        names.append(("seg_delta_b", "must be >= 0 (inf allowed), no NaN"))
    lm = inp.loss_mask
    if lm.dtype != torch.bool:
        checks.append(((lm == 0) | (lm == 1)).all())
        names.append(("loss_mask", "values must be 0 or 1"))
    checks.append(cu[0] == 0)
    names.append(("cu_seqlens", "cu_seqlens[0] must be 0"))
    checks.append(cu[-1] == n)
    names.append(("cu_seqlens", f"cu_seqlens[-1] must equal the number of tokens N={n} (does not cover the tokens)"))
    if s > 0:
        checks.append((cu[1:] >= cu[:-1]).all())
        names.append(("cu_seqlens", "must be non-decreasing"))
    for name in ("seg_num_tokens", "seg_tokens_before"):
        v = getattr(inp, name)
        if v is not None:
            checks.append((v >= 0).all())
            names.append((name, "counts must be >= 0"))
    if checks:
        dev = inp.logprobs.device
        ok = torch.stack([c.to(device=dev, dtype=torch.bool).reshape(()) for c in checks]).tolist()
        for good, (name, msg) in zip(ok, names):
            if not good:
                err(name, msg)
