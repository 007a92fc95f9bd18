"""Aggregation (algorithms.md Sec. 5) with caller-supplied GLOBAL counts, so the loss of a microbatch is a
partial sum and summing microbatches (and DP / CP ranks) gives the global loss exactly.

| loss_agg_mode            | weight of a loss token of sequence i                  |
| token-mean               | 1 / num_tokens                                         |
| seq-mean-token-sum       | 1 / num_sequences                                      |
| seq-mean-token-mean      | 1 / (T_i * num_sequences), T_i = the sequence's loss tokens (seg_num_tokens) |
| seq-mean-token-sum-norm  | 1 / (num_sequences * max_response_length)  (Dr. GRPO)  |

Zero counts are clamped to 1: an all-masked batch has all weights 0 and gives loss 0, never 0/0.
Each mode is a weight function registered by name (registry.AGGREGATIONS), after Batch below.
`Batch` holds one microbatch prepared once (fp32 views, masks, segment info) and the metric reductions.
"""

from __future__ import annotations

from functools import cached_property

import torch

from .inputs import GlobalCounts, PolicyInputs, segment_ids, segment_sum
from .registry import AGGREGATIONS, register_aggregation


def _count(value, device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=device).clamp(min=1.0)


class Batch:
    """What every mode and reduction needs, prepared once by compute_policy_loss.

    lp [N] fp32 log pi (carries grad); anchor [N] fp32 anchor log-probs, adv [N] fp32 advantages (both
    detached); m [N] bool loss mask and mf its fp32 copy (multiplying by a float mask is far cheaper on CPU
    than torch.where or a bool product); seg / seg_tokens / local_tokens computed only when used.
    """

    def __init__(self, anchor: str, inp: PolicyInputs, counts: GlobalCounts):
        self.inp, self.counts = inp, counts
        self.lp = inp.logprobs.float()
        self.anchor = inp.anchor_logprobs(anchor).detach().float()
        self.adv = inp.advantages.detach().float()
        self.m = inp.mask
        self.mf = self.m.float()
        self.device = self.lp.device

    @cached_property
    def seg(self) -> torch.Tensor:
        """[N] segment id of each token."""
        return segment_ids(self.inp.cu_seqlens.to(self.device), self.inp.num_tokens)

    @cached_property
    def local_tokens(self) -> torch.Tensor:
        """[S] loss tokens of each segment held here."""
        return segment_sum(self.m.to(torch.int64), self.seg, self.inp.num_segments)

    @cached_property
    def seg_tokens(self) -> torch.Tensor:
        """[S] loss tokens of each segment's WHOLE sequence (seg_num_tokens under context parallel)."""
        given = self.inp.seg_num_tokens
        return given.to(self.device) if given is not None else self.local_tokens

    def weights(self, agg_mode: str) -> torch.Tensor:
        """[N] fp32 detached weights (0 off the loss mask) of the registered `agg_mode`;
        loss = sum_t weight_t * loss_t."""
        spec = AGGREGATIONS.get(agg_mode)
        if spec is None:
            raise ValueError(f"loss_agg_mode: got {agg_mode!r}; allowed: "
                             + ", ".join(repr(name) for name in AGGREGATIONS))
        if spec.max_response_length and self.counts.max_response_length is None:
            raise ValueError(f"GlobalCounts.max_response_length: required by loss_agg_mode {agg_mode!r}")
        return spec(self)

    # ---- metric partials: sum-reduced (means over global counts) or max-reduced (`*_max`) --------------
    def token_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of values over loss tokens / global num_tokens (detached fp32 0-d)."""
        if values.dtype == torch.bool:
            total = (values & self.m).sum().to(torch.float32)
        else:
            total = torch.dot(values.detach().float(), self.mf)
        return total / _count(self.counts.num_tokens, self.device)

    def local_max(self, values: torch.Tensor) -> torch.Tensor:
        """Max over this batch's loss tokens (0 when there are none; every `*_max` metric is >= 0)."""
        v = values.detach().float() * self.mf
        return v.max() if v.numel() else v.new_zeros(())

    def sequence_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence values [S] / global num_sequences. A segment holding part of a sequence (context
        parallel) contributes its share local_tokens / seg_tokens, so the shares sum to one value per
        sequence; segments without loss tokens contribute nothing."""
        share = self.local_tokens.to(torch.float32) / self.seg_tokens.to(torch.float32).clamp(min=1.0)
        total = (values.detach().to(torch.float32) * share).sum()
        return total / _count(self.counts.num_sequences, self.device)


# ---- the aggregation modes: name -> fn(batch) -> [N] weights (the table in the module docstring) ---------

@register_aggregation("token-mean")
def _token_mean(b: Batch) -> torch.Tensor:
    return b.mf / _count(b.counts.num_tokens, b.device)


@register_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(b: Batch) -> torch.Tensor:
    return b.mf / _count(b.counts.num_sequences, b.device)


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(b: Batch) -> torch.Tensor:
    n_seq = _count(b.counts.num_sequences, b.device)
    per_seq = (b.seg_tokens.to(torch.float32).clamp(min=1.0) * n_seq).index_select(0, b.seg)
    return b.mf / per_seq


@register_aggregation("seq-mean-token-sum-norm", max_response_length=True)
def _seq_mean_token_sum_norm(b: Batch) -> torch.Tensor:
    return b.mf / (_count(b.counts.num_sequences, b.device) * float(b.counts.max_response_length))
