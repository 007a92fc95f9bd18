"""CPPO's trust region: position weights and a cumulative prefix budget, as one segmented scan
(algorithms.md Sec. 4; CPPO Sec. 3.3-3.4, Eq. 8-10, 22, Alg. 1).

Per segment, over its loss tokens only (t = 1..T counts only tokens with m_t = 1):

    w_t = 1 - (1 - w_min) (t - 1) / max(T - 1, 1)          Eq. 9
    Z_t = w_t D_t,  S_t = sum_{j<=t} Z_j,  W_t = sum_{j<=t} w_j
    c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1})     Eq. 8 (may go negative)
    I_t = Z_t <= c_t                                        (Eq. 10 then ORs in the direction rule)

No Python loop. The budget term is one fp64 segmented scan: delta_b W_{t-1} - S_{t-1} = sum_{j<t} w_j
(delta_b - D_j), a global cumsum minus each segment's starting value; the positions t are an integer
segmented scan of m. Every loss token counts in S and W whether or not it ends up masked (Alg. 1 updates
them unconditionally); non-loss tokens count nowhere.

Interpretation of t for horizon 'max' (the spec says "absolute positions"): t is the 1-based rank of the
token among its sequence's loss tokens, the same as for 'sequence'; only T differs (max_response_length).
In a right-padded single-turn response that rank IS the absolute response position; in a packed segment
holding prompt + response it excludes the prompt, and with tool output inside a response it skips the
tool tokens (they are not the policy's tokens).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .inputs import segment_ids, segment_sum


class CppoMask:
    """What cppo_mask returns. The threshold c_t is computed only when read: the mask itself compares
    Z_t + y_t with the inclusive scan instead (see cppo_mask), which saves passes on the hot path."""

    def __init__(self, inside, budget_only, delta_b, z_sum, threshold_fn):
        self.inside = inside            # [N] bool: I_t (True on non-loss tokens)
        self.budget_only = budget_only  # [N] bool: Z_t <= delta_t but Z_t > c_t: refused by the prefix budget alone
        self.delta_b = delta_b          # [S] fp64: the prefix-average budget used for each segment
        self.z_sum = z_sum              # [S] fp64: sum of Z_t over the segment's loss tokens (its CP-scan share)
        self._threshold_fn = threshold_fn

    @property
    def threshold(self) -> torch.Tensor:
        """[N] fp64: c_t (Eq. 8) on loss tokens."""
        return self._threshold_fn()


@torch.no_grad()
def cppo_mask(divergence: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, *,
              delta: Union[float, torch.Tensor], w_min: float = 0.8, horizon: str = "max",
              max_response_length: Optional[int] = None, delta_b_mode: str = "fixed", delta_b: float = 0.015,
              delta_b_min: float = 0.02, cap_mult: float = 2.0,
              seg_num_tokens: Optional[torch.Tensor] = None, seg_tokens_before: Optional[torch.Tensor] = None,
              seg_prefix_z: Optional[torch.Tensor] = None, seg_delta_b: Optional[torch.Tensor] = None,
              check: bool = True) -> CppoMask:
    """CPPO trust-region indicator I_t over packed segments. A pure function on flat tensors.

    divergence [N] (D_t, any float dtype), loss_mask [N] (bool or 0/1), cu_seqlens [S+1];
    delta: a float or a per-token [N] tensor (delta_high where A > 0, delta_low where A < 0).
    horizon 'sequence' (T = the sequence's loss-token count) or 'max' (T = max_response_length).
    delta_b_mode 'fixed' (delta_b; math.inf gives DPPO) or 'p90' (Eq. 22: per segment
    clamp(quantile_0.9(D), delta_b_min, cap_mult * delta_b_min); an empty segment uses delta_b_min).

    Context parallel: a segment may be a chunk of a longer sequence. Then pass, per segment [S],
    seg_num_tokens (the whole sequence's loss tokens; horizon 'sequence'), seg_tokens_before (loss tokens of
    the sequence before this chunk), seg_prefix_z (sum of the earlier chunks' `z_sum`: an exclusive scan
    across ranks) and seg_delta_b (p90 must see the whole sequence: compute it once, e.g. by calling this
    function on the all-gathered D). Chunks given this way get exactly the whole sequence's I_t.

    Host reads: on CPU tensors two shortcuts read values (equal-length segments take the [S, L] row
    layout; an all-finite delta_b skips the infinite-budget handling). On an accelerator both would be a
    device sync per call, so the general packed formulation runs instead (the same mask; the scans agree to
    fp64 rounding: tests/test_device.py). `check` (default True) verifies that no loss token's position
    exceeds the horizon T when T comes from the caller (horizon 'max', or seg_num_tokens): one host read;
    False skips it, for inputs checked before (PolicyInputs(check_values=False)).
    """
    n, s = divergence.shape[0], cu_seqlens.shape[0] - 1
    dev, f64 = divergence.device, torch.float64
    m = loss_mask.to(dev)
    m = m if m.dtype == torch.bool else m != 0
    if horizon not in ("sequence", "max"):
        raise ValueError(f"horizon: got {horizon!r}; allowed: 'sequence', 'max'")
    if delta_b_mode not in ("fixed", "p90"):
        raise ValueError(f"delta_b_mode: got {delta_b_mode!r}; allowed: 'fixed', 'p90'")
    if horizon == "max" and max_response_length is None:
        raise ValueError("max_response_length: required with horizon 'max' (GlobalCounts.max_response_length)")
    host = _host_reads(dev)       # value reads cost no device sync (see the docstring)
    lay = _Layout(cu_seqlens.to(device=dev, dtype=torch.int64), n, host)
    mt = lay.tok(m)
    mf = mt.to(f64)        # (a float mask: multiplying by a bool tensor or cumsum-with-cast is ~8x slower on CPU)

    # Positions: t = the inclusive segmented scan of m (exact in fp64), plus earlier chunks' loss tokens.
    cnt = lay.scan(mf)
    n_local = lay.total(cnt)                                                   # [S] loss tokens in the segment
    before = (seg_tokens_before.to(device=dev, dtype=f64) if seg_tokens_before is not None
              else torch.zeros(s, dtype=f64, device=dev))
    big_t = ((seg_num_tokens.to(device=dev, dtype=f64) if seg_num_tokens is not None else n_local + before)
             if horizon == "sequence" else torch.full((s,), float(max_response_length), dtype=f64, device=dev))
    caller_t = horizon == "max" or seg_num_tokens is not None     # else T counts the segment: never exceeded
    if check and caller_t and s and bool(((n_local + before > big_t) & (n_local > 0)).any()):
        raise ValueError("max_response_length / seg_num_tokens: a loss token's position t exceeds the horizon T "
                         "(T must count every loss token of the sequence)")

    # Eq. 9: w_t = 1 - k (t - 1) with t = cnt + before, i.e. (1 + k (1 - before)) - k cnt. Then masked (w m).
    k_seg = (1.0 - w_min) / (big_t - 1.0).clamp(min=1.0)                     # [S] slope
    if horizon == "max" and seg_tokens_before is None:
        k = (1.0 - w_min) / max(float(max_response_length) - 1.0, 1.0)
        w = torch.rsub(cnt, 1.0 + k, alpha=k)                                 # (1 + k) - k cnt, one pass
    else:
        w = cnt.mul_(lay.per_seg(-k_seg)).add_(lay.per_seg(1.0 + k_seg * (1.0 - before)))
    w = w.mul_(mf)
    d64 = lay.tok(divergence).to(f64)
    z = w * d64                                                                # Z_t (0 off the loss mask)
    d = lay.tok(delta.to(device=dev, dtype=f64)) if isinstance(delta, torch.Tensor) else float(delta)
    within = z <= d

    if seg_delta_b is not None:
        db = seg_delta_b.to(device=dev, dtype=f64)
    elif delta_b_mode == "fixed":
        db = torch.full((s,), float(delta_b), dtype=f64, device=dev)
    else:
        q = lay.quantile(lay.tok(divergence), mt, 0.9)
        db = torch.where(torch.isnan(q), delta_b_min, q.clamp(delta_b_min, cap_mult * delta_b_min))  # Eq. 22

    def w_sum(b):      # [S] sum of w over the first b loss tokens: b - k b (b - 1) / 2 (w is linear in t)
        return b - k_seg * b * (b - 1.0) / 2.0

    if delta_b_mode == "fixed" and seg_delta_b is None and math.isinf(delta_b):
        # delta_b = inf: no budget, c_t = delta (the DPPO limit, exact: I_t = D_t <= delta)
        inside = within | ~mt
        return CppoMask(lay.flat(inside), torch.zeros_like(m), db, lay.total(lay.scan(z)),
                        lambda: lay.flat(torch.as_tensor(d, dtype=f64, device=dev).expand_as(z)))

    # Eq. 8 as ONE scan. With y_j = w_j (delta_b - D_j): delta_b W_{t-1} - S_{t-1} = sum_{j<t} y_j, so
    # c_t = min(delta, delta + sum_{j<t} y_j). No two large prefix sums (S and delta_b W both grow with t)
    # are subtracted, and one cumsum does it. Z_t <= delta + sum_{j<t} y_j  <=>  Z_t + y_t - sum_{j<=t} y_j
    # <= delta, and Z_t + y_t = delta_b w_t: so the test needs only the inclusive scan. fp64 throughout.
    finite = torch.isfinite(db)
    all_finite = (bool(finite.all()) if s else True) if host else False   # False: the general form, no sync
    db_fin = db if all_finite else torch.where(finite, db, 0.0)
    scalar_db = seg_delta_b is None and delta_b_mode == "fixed"
    dbw = None if scalar_db else lay.per_seg(db_fin) * w                     # delta_b w_t
    neg_y = torch.add(z, w, alpha=-float(delta_b)) if scalar_db else z - dbw  # -y_t
    neg_cy = lay.scan(neg_y)                                                  # -sum_{j<=t} y_j
    lhs = torch.add(neg_cy, w, alpha=float(delta_b)) if scalar_db else neg_cy + dbw   # delta_b w_t - sum_{j<=t} y
    carry = None
    if seg_tokens_before is not None or seg_prefix_z is not None:             # earlier chunks (context parallel)
        carry = db_fin * w_sum(before)
        if seg_prefix_z is not None:
            carry = carry - seg_prefix_z.to(device=dev, dtype=f64)
        carry = lay.per_seg(carry)
        lhs = lhs.sub_(carry)
    budget_ok = lhs <= d
    if not all_finite:                           # segments with delta_b = inf: no budget
        budget_ok |= ~lay.per_seg(finite)
    # sum of Z over the chunk = delta_b * (sum of its w) - (sum of its y)
    z_sum = db_fin * (w_sum(n_local + before) - w_sum(before)) + lay.total(neg_cy)
    if not all_finite:
        z_sum = torch.where(finite, z_sum, lay.total(lay.scan(z)))

    def threshold():
        slack = neg_y - neg_cy if carry is None else neg_y - neg_cy + carry     # sum_{j<t} y_j (+ carry)
        c = torch.minimum(slack + d, torch.as_tensor(d, dtype=f64, device=dev))
        if not all_finite:
            c = torch.where(lay.per_seg(finite), c, torch.as_tensor(d, dtype=f64, device=dev))
        return lay.flat(c)

    inside = (within & budget_ok) | ~mt
    budget_only = within & ~budget_ok & mt
    return CppoMask(lay.flat(inside), lay.flat(budget_only), db, z_sum, threshold)


def _host_reads(dev: torch.device) -> bool:
    return dev.type == "cpu"


class _Layout:
    """Segmented-scan primitives over cu_seqlens. When every segment has the same length L (a padded batch)
    per-token tensors are viewed as [S, L]: a scan is a row cumsum and a per-segment value broadcasts as
    [S, 1] for free. Otherwise (packed) they stay [N]: a scan is one global cumsum minus each segment's
    starting value, and per-segment values are gathered by segment id."""

    def __init__(self, cu: torch.Tensor, n: int, host: bool = True):
        self.cu, self.n, self.s = cu, n, cu.shape[0] - 1
        lengths = cu[1:] - cu[:-1]
        # the row layout is a CPU shortcut: deciding it on an accelerator would be a device sync
        self.rows = host and self.s > 0 and n > 0 and bool((lengths == lengths[0]).all())
        self._seg = None

    def quantile(self, v, m, q):     # [S] fp64 q-quantile of each segment's masked values (NaN if none)
        if not self.rows:
            return segment_quantile(v, m, self.segment_ids(), self.s, q)
        # rows: the answer sits among each row's top ~(1 - q) n values, so a row-wise topk beats a sort
        v = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
        counts = m.sum(dim=1)
        pos = q * (counts - 1).clamp(min=0).to(torch.float64)
        lo, hi = pos.floor(), pos.ceil()
        need = max(int((counts - lo.long()).max()), 1)
        top = torch.topk(v.masked_fill(~m, -math.inf), need, dim=1).values.to(torch.float64)   # descending
        v_lo = top.gather(1, (counts - 1 - lo.long()).clamp(min=0)[:, None])[:, 0]
        v_hi = top.gather(1, (counts - 1 - hi.long()).clamp(min=0)[:, None])[:, 0]
        return torch.where(counts > 0, torch.lerp(v_lo, v_hi, pos - lo), float("nan"))

    def segment_ids(self) -> torch.Tensor:
        if self._seg is None:
            self._seg = segment_ids(self.cu, self.n)
        return self._seg

    def tok(self, x):                # per-token [N] -> working shape
        return x.view(self.s, self.n // self.s) if self.rows else x

    def flat(self, x):
        return x.reshape(-1)

    def per_seg(self, v):            # [S] -> broadcastable against the working shape
        return v[:, None] if self.rows else v.index_select(0, self.segment_ids())

    def scan(self, x):               # inclusive cumsum within each segment (in x's dtype: pass fp64)
        if self.rows:
            return torch.cumsum(x, 1)
        c = torch.cumsum(x, 0)
        return c.sub_(self.per_seg(self._before(c)))

    def total(self, c):              # [S] per-segment total from an inclusive segmented scan
        if self.rows:
            return c[:, -1].clone()
        if self.n == 0:
            return c.new_zeros(self.s)
        last = (self.cu[1:] - 1).clamp(min=0)
        return c.index_select(0, last) * (self.cu[1:] > self.cu[:-1])

    def _before(self, c):            # global inclusive scan just before each segment starts
        if self.n == 0:
            return c.new_zeros(self.s)
        return c.index_select(0, (self.cu[:-1] - 1).clamp(min=0)) * (self.cu[:-1] > 0)


def segment_quantile(values: torch.Tensor, mask: torch.Tensor, seg: torch.Tensor, num_segments: int,
                     q: float) -> torch.Tensor:
    """[S] fp64: the q-quantile of each segment's masked values, linear interpolation (torch.quantile's
    default); NaN for a segment with no masked value. Vectorised with two stable sorts (by value, then by
    segment), so no torch.quantile size limit and no bf16 restriction."""
    v = values.detach()
    v = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v   # sort in fp32 (exact order), lerp in fp64
    n = v.shape[0]
    counts = segment_sum(mask.to(torch.int64), seg, num_segments)
    if n == 0:
        return torch.full((num_segments,), float("nan"), dtype=torch.float64, device=v.device)
    key = torch.where(mask, seg, num_segments).to(torch.int32)   # non-loss tokens sort after every segment
    by_value = torch.sort(v, stable=True).indices
    order = by_value[torch.sort(key[by_value], stable=True).indices]
    sv = v[order].to(torch.float64)
    start = torch.cumsum(counts, 0) - counts
    pos = q * (counts - 1).clamp(min=0).to(torch.float64)
    lo, hi = pos.floor(), pos.ceil()
    v_lo = sv[(start + lo.long()).clamp(max=n - 1)]
    v_hi = sv[(start + hi.long()).clamp(max=n - 1)]
    return torch.where(counts > 0, torch.lerp(v_lo, v_hi, pos - lo), float("nan"))
