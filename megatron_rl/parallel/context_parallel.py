"""Context parallel for the loss: Megatron's load-balanced split and the exact CPPO scan across it.

Split (Megatron / transformer-engine THD order): every packed segment, padded to a multiple of
2 * cp tokens, is cut into 2 * cp equal chunks; CP rank r holds chunks r and 2cp - 1 - r (an early and
a late chunk: causal attention work is balanced). Locally a rank holds, per segment, its two chunks one
after the other. For the loss each chunk is its own local segment (the two chunks of one rank are
not adjacent in the sequence, so a scan must not run from one into the other): `local_cu_seqlens` has
2 entries per segment.

CPPO across ranks (algorithms.md Sec. 4): the per-token mask needs, for each chunk, the number of loss
tokens and the sum of w_t * D_t over all earlier chunks of its sequence (an exclusive scan across
ranks), the whole sequence's loss-token count (horizon 'sequence') and, for p90 calibration, every D of
the sequence. The simplest exact way, used here: all-gather the per-token scalars (D, loss_mask, and
the log-ratio for GSPO) over the CP group, rebuild every sequence, and compute those per-chunk values
with the pure `cppo_mask`. They go into PolicyInputs' seg_* fields, so the local loss then gives every
token exactly the mask and weight it has unsplit. Every rank joins the one all-gather whatever it holds
(a rank holding only padding included), so nothing can deadlock.

Devices: the index bookkeeping is read from cu_seqlens on the host (a few ints per segment) and built on
the device of the tensors it indexes: partition_index on cu_seqlens' device (packing: the host), the
scan on the per-token values' device (the GPU in training).

Counts: the global token / sequence counts must count each token once: take them from the unsplit
microbatches (every CP rank of a replica has them) summed over DP, never from local chunks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rl.losses import DIVERGENCES, LossConfig, PolicyInputs, cppo_mask


def chunks_of_rank(cp: int, rank: int) -> tuple[int, int]:
    return rank, 2 * cp - 1 - rank


def partition_index(cu_seqlens: torch.Tensor, cp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [S / cp] of this rank's positions in the row, in local order; local cu_seqlens [2n + 1]).

    `cu_seqlens` [n + 1] must cover the row and every segment length be a multiple of 2 * cp (pack with
    pad_multiple = 2 * cp). Both outputs are on cu_seqlens' device."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    dev = cu_seqlens.device
    idx, local = [], [0]
    for a, b in zip(cu[:-1], cu[1:]):
        if (b - a) % (2 * cp):
            raise ValueError(f"segment [{a}, {b}) has length {b - a}, not a multiple of 2 x "
                             f"context_parallel_size={cp}: pack with pad_multiple={2 * cp}")
        c = (b - a) // (2 * cp)
        for k in chunks_of_rank(cp, rank):
            idx.append(torch.arange(a + k * c, a + (k + 1) * c, device=dev))
            local.append(local[-1] + c)
    index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64, device=dev)
    return index, torch.tensor(local, dtype=torch.int64, device=dev)


def _gather_order(local_cu: torch.Tensor, cp: int, dev: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the rows all-gathered from every rank ([cp * S_loc], rank-major): the index that puts them
    in sequence order, the chunk-level cu_seqlens [2cp * n + 1] and sequence-level cu_seqlens [n + 1]
    of that order, all on `dev`."""
    lc = [int(x) for x in local_cu.tolist()]
    s_loc = lc[-1]
    n = (len(lc) - 1) // 2
    order, chunk_cu, seq_cu = [], [0], [0]
    for j in range(n):
        c = lc[2 * j + 1] - lc[2 * j]
        for k in range(2 * cp):
            r, slot = (k, 0) if k < cp else (2 * cp - 1 - k, 1)
            start = r * s_loc + lc[2 * j + slot]
            order.append(torch.arange(start, start + c, device=dev))
            chunk_cu.append(chunk_cu[-1] + c)
        seq_cu.append(chunk_cu[-1])
    index = torch.cat(order) if order else torch.zeros(0, dtype=torch.int64, device=dev)
    as_t = lambda v: torch.tensor(v, dtype=torch.int64, device=dev)  # noqa: E731
    return index, as_t(chunk_cu), as_t(seq_cu)


def _local_chunks(n: int, cp: int, rank: int, dev: torch.device) -> torch.Tensor:
    """Chunk-level indices (into 2cp * n) of this rank's 2n local segments, in local order."""
    k0, k1 = chunks_of_rank(cp, rank)
    return torch.tensor([j * 2 * cp + k for j in range(n) for k in (k0, k1)], dtype=torch.int64, device=dev)


@torch.no_grad()
def cp_segment_fields(divergence: torch.Tensor, loss_mask: torch.Tensor, local_cu: torch.Tensor, group,
                      cfg: LossConfig, max_response_length: Optional[int] = None,
                      log_ratio: Optional[torch.Tensor] = None) -> dict:
    """seg_* fields of PolicyInputs for this rank's local chunk-segments (see the module docstring).

    divergence, loss_mask, log_ratio: [S_loc] local per-token values; local_cu: from partition_index.
    One all-gather over `group` (joined by every rank). Returns seg_num_tokens, seg_tokens_before,
    seg_prefix_z, seg_delta_b (only with delta_b_mode 'p90') and seg_log_ratio_sum (when log_ratio given).
    """
    cp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    dev, f64 = divergence.device, torch.float64
    m = (loss_mask.to(dev) != 0).to(f64)
    cols = [divergence.detach().to(torch.float64) * m, m]
    if log_ratio is not None:
        cols.append(log_ratio.detach().to(torch.float64) * m)
    local = torch.stack(cols, dim=1)                                   # [S_loc, 2 or 3]
    if cp > 1:
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        gathered = torch.cat(parts)
    else:
        gathered = local
    order, chunk_cu, seq_cu = _gather_order(local_cu, cp, dev)
    full = gathered[order]                                             # every sequence, in order
    d_full, m_full = full[:, 0], full[:, 1] != 0
    n = seq_cu.numel() - 1
    nchunks = chunk_cu.numel() - 1
    chunk_seq = torch.arange(n, device=dev).repeat_interleave(2 * cp)   # sequence of each chunk

    # loss tokens per chunk, per sequence, and before each chunk within its sequence
    ends = torch.cat([torch.zeros(1, dtype=f64, device=dev), m_full.to(f64).cumsum(0)])
    chunk_tokens = (ends[chunk_cu[1:]] - ends[chunk_cu[:-1]]).round().to(torch.int64)
    seq_tokens = torch.zeros(n, dtype=torch.int64, device=dev).index_add(0, chunk_seq, chunk_tokens)
    incl = chunk_tokens.view(n, 2 * cp).cumsum(1) if n else chunk_tokens.view(0, 2 * cp)
    tokens_before = (incl - chunk_tokens.view(n, 2 * cp)).reshape(-1)

    kwargs = dict(w_min=cfg.w_min, horizon=cfg.horizon, max_response_length=max_response_length)
    # p90 needs every D of the whole sequence: one call over whole sequences
    if cfg.delta_b_mode == "p90":
        seq_delta_b = cppo_mask(d_full, m_full, seq_cu, delta=math.inf, delta_b_mode="p90",
                                delta_b_min=cfg.delta_b_min, cap_mult=cfg.cap_mult, **kwargs).delta_b
    # z = w_t D_t per chunk with each chunk's true positions t and horizon T
    z_chunk = cppo_mask(d_full, m_full, chunk_cu, delta=math.inf, delta_b_mode="fixed", delta_b=math.inf,
                        seg_num_tokens=seq_tokens[chunk_seq], seg_tokens_before=tokens_before,
                        **kwargs).z_sum if nchunks else torch.zeros(0, dtype=f64, device=dev)
    zc = z_chunk.view(n, 2 * cp)
    prefix_z = (zc.cumsum(1) - zc).reshape(-1)

    mine = _local_chunks(n, cp, rank, dev)
    out = {"seg_num_tokens": seq_tokens[chunk_seq][mine], "seg_tokens_before": tokens_before[mine],
           "seg_prefix_z": prefix_z[mine]}
    if cfg.delta_b_mode == "p90":
        out["seg_delta_b"] = seq_delta_b[chunk_seq][mine]
    if log_ratio is not None:
        lr = full[:, 2]
        seq_lr = torch.zeros(n, dtype=f64, device=dev).index_add(
            0, torch.arange(n, device=dev).repeat_interleave(seq_cu[1:] - seq_cu[:-1]), lr)
        out["seg_log_ratio_sum"] = seq_lr[chunk_seq][mine]
    return out


def local_divergence(cfg: LossConfig, inputs: PolicyInputs) -> Optional[torch.Tensor]:
    """D_t of the configured divergence on local tokens (detached), or None when the mode has none."""
    name = cfg.needs.divergence
    if name is None:
        return None
    return DIVERGENCES[name](inputs, inputs.anchor_logprobs(cfg.anchor))[0].detach()


def with_cp_fields(cfg: LossConfig, inputs: PolicyInputs, group, max_response_length: Optional[int] = None
                   ) -> PolicyInputs:
    """`inputs` (this CP rank's chunk-segments, cu_seqlens from partition_index) completed with the
    whole-sequence seg_* fields, so compute_policy_loss gives the unsplit masks and weights.
    Every CP rank must call it (one collective), whatever it holds. Which fields the mode reads comes
    from its registry record (cfg.needs): the counts always (aggregation, metric weights), the
    log-ratio sum if it needs one (GSPO), the scan carries if it needs them (CPPO)."""
    need = cfg.needs
    d = local_divergence(cfg, inputs)
    if d is None:
        d = torch.zeros_like(inputs.logprobs, dtype=torch.float64)
    log_ratio = None
    if need.seq_log_ratio_sum:
        log_ratio = inputs.logprobs.detach().float() - inputs.anchor_logprobs(cfg.anchor).float()
    fields = cp_segment_fields(d, inputs.loss_mask, inputs.cu_seqlens, group, cfg, max_response_length,
                               log_ratio=log_ratio)
    if not need.cp_scan:
        fields = {k: v for k, v in fields.items() if k in ("seg_num_tokens", "seg_log_ratio_sum")}
    return dataclasses.replace(inputs, **fields)
