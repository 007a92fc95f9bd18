"""Per-token divergences D_t = D(anchor(.|s_t) || pi(.|s_t)), anchor first (algorithms.md Sec. 3;
DPPO Sec. 4.4, Eq. 13-16). All fp32 and detached: they only decide the mask.

Ordering (DPPO App. B, data processing over coarser partitions): binary <= top-K <= exact, for TV and KL.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .inputs import PolicyInputs
from .registry import register_divergence

# Floor for log-probabilities of empty buckets / log(1 - p) at p == 1: keeps D finite (fp32's tiniest normal).
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


class Divergence(NamedTuple):
    value: torch.Tensor                     # [N] fp32, >= 0
    tail_mass: Optional[torch.Tensor] = None  # [N] the anchor's "other" bucket (top-K only), logged as
    #                                           topk_tail_mass_*: how much of mu the K ids leave out


def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p <= 0, accurate at both ends (Maechler 2012): log(-expm1(log p)) for p > 1/2
    (finite for p near 1, where 1 - p cancels in fp32), log1p(-p) for p <= 1/2 (exact for tiny p).
    Floored at p == 1, so binary KL stays finite there (algorithms.md Sec. 3)."""
    near_one = logp > -math.log(2.0)
    out = torch.where(near_one, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))
    return out.clamp(min=LOG_TINY)


# ---- binary: the sampled token vs everything else --------------------------------------------------------

@torch.no_grad()
def binary_tv(logprobs: torch.Tensor, anchor_logprobs: torch.Tensor) -> torch.Tensor:
    """[N] |pi_a - mu_a| (algorithms.md Sec. 3, binary_tv)."""
    return (logprobs.detach().float().exp() - anchor_logprobs.float().exp()).abs()


@torch.no_grad()
def binary_kl(logprobs: torch.Tensor, anchor_logprobs: torch.Tensor) -> torch.Tensor:
    """[N] mu_a log(mu_a / pi_a) + (1 - mu_a) log((1 - mu_a) / (1 - pi_a)) (algorithms.md Sec. 3, binary_kl),
    clamped >= 0 (it is >= 0 exactly; fp32 rounding can dip below when pi_a is close to mu_a)."""
    lp = logprobs.detach().float().clamp(max=0.0)
    la = anchor_logprobs.float().clamp(max=0.0)
    head = la.exp() * (la - lp)
    # 1 - mu_a = -expm1(la) is exactly 0 when mu_a == 1, and the floored log keeps 0 * log(0) at 0.
    tail = -torch.expm1(la) * (_log1mexp(la) - _log1mexp(lp))
    return (head + tail).clamp(min=0.0)


# ---- top-K: buckets TopK(mu) u {a_t} (deduplicated) + "other" ---------------------------------------------

class TopKParts(NamedTuple):
    """One policy's top-K buckets, kept in pieces so no [N, K+2] tensor is built on the hot path."""
    logp: torch.Tensor    # [N, K] log-probs at the top-K ids
    p: torch.Tensor       # [N, K] probabilities at the top-K ids
    token: torch.Tensor   # [N] probability of the sampled token's own bucket (0 when it is among the ids)
    other: torch.Tensor   # [N] the "other" bucket, max(1 - sum of the above, 0)


@torch.no_grad()
def topk_parts(topk_ids: torch.Tensor, tokens: torch.Tensor, topk_logprobs: torch.Tensor,
               token_logprobs: torch.Tensor, new_token: Optional[torch.Tensor] = None) -> TopKParts:
    """Buckets TopK u {a_t} + "other" of one policy (algorithms.md Sec. 3, Top-K). The top-K ids of a
    distribution are distinct (vLLM returns ranks 1..K); the sampled token is deduplicated against them
    (`new_token` [N] bool: True where it is not among the ids; computed when not given).
    "other" keeps its relative precision when the first id dominates (the usual peaked LLM case):
    1 - sum q = -expm1(log q_0) - sum_{rest} q, instead of 1 - (a sum close to 1) in fp32."""
    if new_token is None:
        new_token = ~(topk_ids == tokens.to(topk_ids.dtype)[:, None]).any(dim=1)
    lp = topk_logprobs.detach().float()
    p = lp.exp()
    tok = token_logprobs.detach().float().clamp(max=0.0).exp() * new_token
    other = -torch.expm1(lp[:, 0].clamp(max=0.0)) - p[:, 1:].sum(dim=1) - tok
    return TopKParts(lp, p, tok, other.clamp(min=0.0))


@torch.no_grad()
def topk_buckets(topk_ids: torch.Tensor, tokens: torch.Tensor, anchor_topk_logprobs: torch.Tensor,
                 anchor_token_logprobs: torch.Tensor, topk_logprobs: torch.Tensor,
                 token_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket probabilities of the anchor and of pi, each [N, K+2] fp32 (algorithms.md Sec. 3, Top-K): the
    K ids, the sampled token (0 when already among the ids: never counted twice), the "other" bucket.
    Inputs: topk_ids [N, K] int, tokens [N] int, anchor_topk_logprobs / topk_logprobs [N, K] (anchor's and
    pi's log-probs at topk_ids), anchor_token_logprobs / token_logprobs [N] (at the sampled token)."""
    new = ~(topk_ids == tokens.to(topk_ids.dtype)[:, None]).any(dim=1)
    out = []
    for lp, tok_lp in ((anchor_topk_logprobs, anchor_token_logprobs), (topk_logprobs, token_logprobs)):
        q = topk_parts(topk_ids, tokens, lp, tok_lp, new)
        out.append(torch.cat([q.p, q.token[:, None], q.other[:, None]], dim=1))
    return out[0], out[1]


@torch.no_grad()
def topk_tv(a: TopKParts, p: TopKParts) -> torch.Tensor:
    """[N] Top-K-TV: 1/2 sum over buckets |mu_b - pi_b|."""
    return 0.5 * ((a.p - p.p).abs().sum(dim=1) + (a.token - p.token).abs() + (a.other - p.other).abs())


@torch.no_grad()
def topk_kl(a: TopKParts, p: TopKParts) -> torch.Tensor:
    """[N] Top-K-KL: sum over buckets mu_b log(mu_b / pi_b); the id buckets straight from the log-probs,
    the two derived buckets with 0 log 0 = 0 and pi_b floored at fp32's tiniest normal; clamped >= 0."""
    ids = torch.einsum("nk,nk->n", a.p, a.logp - p.logp)
    return (ids + _xlogy_ratio(a.token, p.token) + _xlogy_ratio(a.other, p.other)).clamp(min=0.0)


def _xlogy_ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(torch.float32).tiny
    return x * (x.clamp(min=tiny).log() - y.clamp(min=tiny).log())


@torch.no_grad()
def exact_tv(full_logprobs: torch.Tensor, anchor_full_logprobs: torch.Tensor) -> torch.Tensor:
    """[N] TV over the full vocabulary, from [N, V] log-probs (test oracle; small vocabularies)."""
    return 0.5 * (anchor_full_logprobs.float().exp() - full_logprobs.detach().float().exp()).abs().sum(dim=-1)


@torch.no_grad()
def exact_kl(full_logprobs: torch.Tensor, anchor_full_logprobs: torch.Tensor) -> torch.Tensor:
    """[N] KL(anchor || pi) over the full vocabulary, from [N, V] log-probs (in log space: no underflow)."""
    a, p = anchor_full_logprobs.float(), full_logprobs.detach().float()
    return (a.exp() * (a - p)).sum(dim=-1).clamp(min=0.0)


# ---- registry: name -> fn(inputs, anchor_logprobs) -> Divergence, with its inputs and default delta ----
# (algorithms.md Sec. 3 "Defaults": TV 0.15, the papers use 0.20 for MoE / large runs; KL 0.05)

def _need(inp: PolicyInputs, field: str, who: str):
    if getattr(inp, field) is None:
        raise ValueError(f"PolicyInputs.{field}: required by the {who} divergence")


def _topk(inp: PolicyInputs, anchor_logprobs: torch.Tensor, fn) -> Divergence:
    _need(inp, "topk_ids", "top-K")
    ids = inp.topk_ids
    new = ~(ids == inp.tokens.to(ids.dtype)[:, None]).any(dim=1)
    a = topk_parts(ids, inp.tokens, inp.anchor_topk_logprobs, anchor_logprobs, new)
    p = topk_parts(ids, inp.tokens, inp.topk_logprobs, inp.logprobs, new)
    return Divergence(fn(a, p), a.other)


def _exact(inp: PolicyInputs, fn) -> Divergence:
    _need(inp, "full_logprobs", "exact")
    return Divergence(fn(inp.full_logprobs, inp.anchor_full_logprobs))


@register_divergence("binary_tv", default_delta=0.15)
def _binary_tv_of(inp: PolicyInputs, anchor_logprobs: torch.Tensor) -> Divergence:
    return Divergence(binary_tv(inp.logprobs, anchor_logprobs))


@register_divergence("binary_kl", default_delta=0.05)
def _binary_kl_of(inp: PolicyInputs, anchor_logprobs: torch.Tensor) -> Divergence:
    return Divergence(binary_kl(inp.logprobs, anchor_logprobs))


@register_divergence("topk_tv", default_delta=0.15, topk=True)
def _topk_tv_of(inp: PolicyInputs, anchor_logprobs: torch.Tensor) -> Divergence:
    return _topk(inp, anchor_logprobs, topk_tv)


@register_divergence("topk_kl", default_delta=0.05, topk=True)
def _topk_kl_of(inp: PolicyInputs, anchor_logprobs: torch.Tensor) -> Divergence:
    return _topk(inp, anchor_logprobs, topk_kl)


@register_divergence("exact_tv", default_delta=0.15, full_logprobs=True)
def _exact_tv_of(inp: PolicyInputs, anchor_logprobs: torch.Tensor) -> Divergence:
    return _exact(inp, exact_tv)


@register_divergence("exact_kl", default_delta=0.05, full_logprobs=True)
def _exact_kl_of(inp: PolicyInputs, anchor_logprobs: torch.Tensor) -> Divergence:
    return _exact(inp, exact_kl)
