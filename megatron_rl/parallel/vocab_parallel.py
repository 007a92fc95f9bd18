"""Per-token quantities of a vocabulary-parallel (tensor-parallel) logits shard, exact at any TP size.

Under TP each rank holds logits [N, V_pad/tp] for its slice [start, end) of Megatron's padded vocabulary
(padded to a multiple of 128 * tp; ids >= vocab_size are padding). Nothing here materialises the full
vocabulary on a rank, and nothing reads global parallel state: the TP group and the shard's range are
arguments. `group=None` means "no tensor parallelism": one shard, no collectives.

Conventions (all functions):
- logits: [*, W] with W = shard.end - shard.start, fp32 / bf16 / fp16, any leading shape (flattened to
  N tokens by a view, never copied). Never modified, unless `inplace_backward=True` (see _LogProbs).
- temperature: the rollout engine's processing, reproduced exactly: z = float32(logits) / T (vLLM's
  sampler upcasts to fp32, then `logits.div_(temperature)` by its fp32 [N, 1] column). A float or a
  tensor of the leading shape; either becomes an fp32 [N, 1] column (a float: one value, expanded), so
  every z is the fp32 upcast divided in fp32, never logits / T in bf16 / fp16 (a Python float does not
  promote a bf16 tensor: bf16 / 0.7 is rounded to bf16, up to ~0.1 off in log p at |z| ~ 50).
- padding: the columns of global id >= vocab_size are a suffix of the vocabulary, so on every shard the
  real columns are a prefix [0, shard.valid). Only that prefix is ever read: padding gets no probability
  and a zero gradient, and no -inf mask is ever written.
- chunking: the vocabulary pass walks `chunk_rows` tokens at a time (default: chunk_bytes(device) of
  fp32, a per-device budget: see CHUNK_BYTES) through fp32 work buffers reused across chunks, so the
  extra working memory is chunk_rows * W * 4 bytes (split over two buffers when the entropy is needed;
  at least one row per buffer) whatever N is, and bf16 logits are never upcast whole (T != 1 upcasts
  each chunk into a work buffer; at T == 1 on CPU the mixed-dtype sub also makes a transient one-buffer
  upcast per chunk: see _shifted). Beyond that: the [N, W] gradient (none with inplace_backward) and
  O(N * K) per-token vectors.
- validation: local checks, then ONE tiny all-reduce of every rank's facts ([tp, 7] int64) before any
  other collective, so a bad argument raises the same ValueError on every rank (naming the argument and
  the rank) and no rank is left waiting in a collective. It reads values (ids' range, T > 0) on the
  host; `validate=False` skips it (callers that checked already, and fake-tensor tests of the math).
- devices: every tensor is made on the logits' device (a tensor temperature is moved there); only the
  validation facts live on the host when the group can reduce CPU tensors (see _control_device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

Temperature = Union[float, torch.Tensor]

# fp32 work memory per call (>= one row per buffer), by device type; chunk_rows=None uses it.
# - cpu: cache-sized is fastest (each chunk stays in L2 between its passes): docs/bench_vocab_parallel.md.
# - cuda (and any other accelerator): every chunk costs ~6-8 kernel launches forward and backward. A kernel
#   over rows * W fp32 elements runs ~rows * W * 8 B / 4 TB/s on an H200: at 256 MiB (64M elements) that is
#   ~130 us, far above a ~5-10 us launch, so the loop is bandwidth-bound, not launch-bound (at the 1 MiB CPU
#   budget a 152k vocabulary gets 1-2 rows per chunk: ~10^5 launches per 16k-token microbatch). The extra
#   memory is 256 MiB against the 4.6 GiB of a 16k x 152k bf16 logits shard (~5%). Measured by
#   tools/bench_gpu.py (docs/gpu.md) whenever a GPU is lent.
CHUNK_BYTES = {"cpu": 2**20, "cuda": 2**28}


def chunk_bytes(device: Union[str, torch.device]) -> int:
    """The default work-buffer budget of the vocabulary pass on `device` (accelerators: the cuda budget)."""
    kind = torch.device(device).type
    return CHUNK_BYTES.get(kind, CHUNK_BYTES["cuda"])


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, end) of the padded vocabulary; ids >= vocab_size are padding."""

    start: int
    end: int
    vocab_size: int   # the tokenizer's (unpadded) vocabulary

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def valid(self) -> int:
        """Number of leading columns of the shard that are real tokens (the rest is padding)."""
        return max(0, min(self.end, self.vocab_size) - self.start)

    @classmethod
    def megatron(cls, rank: int, tp: int, vocab_size: int, padded_vocab_size: int) -> "VocabShard":
        """Megatron's equal split (VocabUtility.vocab_range_from_global_vocab_size) of the padded vocab."""
        if padded_vocab_size % tp or padded_vocab_size < vocab_size:
            raise ValueError(f"padded_vocab_size={padded_vocab_size} must be >= vocab_size={vocab_size} "
                             f"and a multiple of tp={tp}")
        per = padded_vocab_size // tp
        return cls(rank * per, (rank + 1) * per, vocab_size)


# ----------------------------------------------------------------------------------------------
# validation: local facts -> one [tp, 7] all-reduce -> the same verdict on every rank

_BAD_WIDTH, _BAD_IDS, _BAD_SHAPE, _BAD_TEMP, _BAD_K, _BAD_RANGE = (1 << i for i in range(6))
_FACTS = 7  # error bits, N, K, start, end, vocab_size, topk k


def _group_info(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _control_device(group, like: torch.Tensor) -> torch.device:
    """Where the validation facts live: the host when the group reduces CPU tensors (gloo, or the
    `cpu:gloo,cuda:nccl` groups megatron_rl creates on GPU: no device kernel for a [tp, 7] reduce), else
    the logits' device (a plain NCCL group rejects CPU tensors)."""
    if group is None or like.device.type == "cpu" or "gloo" in str(dist.get_backend(group)):
        return torch.device("cpu")
    return like.device


def _check_on_all_ranks(group, shard: VocabShard, logits: torch.Tensor, ids: Optional[torch.Tensor],
                        temperature: Temperature, topk: int = 0) -> torch.Tensor:
    """Check the arguments on every rank at once; return logits as [N, W]. Raises the same error everywhere.

    Runs once per microbatch, so the ranks exchange a fixed [tp, 7] int64 tensor (error bits and the facts
    that must agree across ranks) in one all-reduce, not pickled messages: an object collective (as the
    checkpoint code uses once per save or load) pickles and takes two collectives, sizes then bytes."""
    rank, tp = _group_info(group)
    err, n, x = 0, -1, None
    lead = tuple(logits.shape[:-1])
    if logits.dim() < 2 or not logits.is_floating_point():
        err |= _BAD_SHAPE
    elif logits.shape[-1] != shard.width:
        err |= _BAD_WIDTH
    else:
        try:   # a view, never a copy of the logits: refuse layouts that cannot be flattened for free
            x = logits.view(-1, shard.width)
            n = x.shape[0]
        except RuntimeError:
            err |= _BAD_SHAPE
    if shard.start < 0 or shard.end <= shard.start or shard.vocab_size < 1:
        err |= _BAD_RANGE
    k = 0
    if ids is not None:
        k = ids.shape[-1] if ids.dim() else 0
        if ids.dtype not in (torch.int64, torch.int32) or tuple(ids.shape[:-1]) != lead:
            err |= _BAD_SHAPE
        elif ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= shard.vocab_size):
            err |= _BAD_IDS
    if isinstance(temperature, torch.Tensor):
        if tuple(temperature.shape) != lead or not bool((temperature > 0).all() & temperature.isfinite().all()):
            err |= _BAD_TEMP
    elif not (math.isfinite(temperature) and temperature > 0):
        err |= _BAD_TEMP
    if topk and not 1 <= topk <= shard.vocab_size:
        err |= _BAD_K
    dev = _control_device(group, logits)
    facts = torch.zeros(tp, _FACTS, dtype=torch.int64, device=dev)
    facts[rank] = torch.tensor([err, n, k, shard.start, shard.end, shard.vocab_size, topk], device=dev)
    if group is not None:
        dist.all_reduce(facts, group=group)
    _verdict(facts)
    return x


def _verdict(facts: torch.Tensor) -> None:
    rows = facts.tolist()
    problems = []

    def ranks(bit):
        return [r for r, f in enumerate(rows) if f[0] & bit]

    for bit, what in ((_BAD_SHAPE, "`logits` must be a floating tensor [*, W] whose leading dims flatten "
                                   "by a view, and `ids`/`target` integer with the same leading shape"),
                      (_BAD_WIDTH, "`logits` last dimension does not equal the shard width `shard.end - "
                                   "shard.start`"),
                      (_BAD_RANGE, "`shard` must have 0 <= start < end and vocab_size >= 1"),
                      (_BAD_IDS, "`ids`/`target` holds a token id outside [0, vocab_size)"),
                      (_BAD_TEMP, "`temperature` must be finite and > 0 (a float or a tensor of the "
                                  "logits' leading shape)"),
                      (_BAD_K, "`k` must be in [1, vocab_size]")):
        if ranks(bit):
            problems.append(f"{what} (on TP rank(s) {ranks(bit)})")
    if not problems:
        per_rank = [(f[1], f[2], f[5], f[6]) for f in rows]
        if len(set(per_rank)) != 1:
            problems.append("ranks disagree on the number of tokens, `ids` width, `shard.vocab_size` or `k`: "
                            f"(N, K, vocab_size, k) by rank = {per_rank}")
        ends = [f[3:5] for f in rows]
        tiles = ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
        if not tiles or ends[-1][1] < rows[0][5]:
            problems.append(f"the shards' [start, end) by rank {ends} must tile [0, padded vocab >= "
                            f"vocab_size={rows[0][5]}) in rank order")
    if problems:
        raise ValueError("vocab_parallel: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# the chunked vocabulary pass


def _rows(width: int, chunk_rows: Optional[int], buffers: int, device: torch.device) -> int:
    """Rows per chunk: `chunk_rows` split over the work buffers, or the device's byte budget."""
    if chunk_rows is None:
        chunk_rows = max(1, chunk_bytes(device) // (4 * max(width, 1)))
    return max(1, chunk_rows // buffers)


def _temp_rows(temperature: Temperature, n: int, device: torch.device) -> Optional[torch.Tensor]:
    """None for T == 1 (no division at all), else an fp32 [N, 1] column of T (a float: expanded, no copy).

    Always a tensor with a dimension, never a Python float: a float (or 0-dim tensor) divisor leaves a
    bf16 dividend's dtype alone, so x / T would be computed and rounded in bf16; an fp32 [N, 1] divisor
    is true fp32 division, as vLLM's div_ by its fp32 temperature column (also on CUDA, where a Python
    float divisor becomes a multiplication by its reciprocal).
    """
    if isinstance(temperature, torch.Tensor):
        return temperature.reshape(n, 1).to(device=device, dtype=torch.float32)
    if temperature == 1.0:
        return None
    return torch.full((1, 1), float(temperature), dtype=torch.float32, device=device).expand(n, 1)


def _scale(v: torch.Tensor, temp, r0: int = 0, r1: Optional[int] = None) -> torch.Tensor:
    """z = float32(v) / T for logits v [rows, K]: the rollout engine's scaling, bit for bit (upcast first,
    then divide in fp32 by the fp32 column; the upcast is a new [rows, K] tensor, never v itself)."""
    v = v.float()
    return v if temp is None else v / temp[r0:r1]


def _shifted(x, r0, r1, w, out, temp, shift=None):
    """out = z - shift for the rows [r0, r1) and real columns of x, z = float32(x) / T; returns (out, shift).

    shift None: the row max of z. out is an fp32 [r1 - r0, w] work buffer (or the fp32 gradient's rows,
    which may alias x: same positions, elementwise); x itself is never written.
    T == 1 takes one pass (a mixed-dtype sub upcasts exactly; on CPU the op upcasts a bf16 chunk into a
    chunk-sized temporary first, on CUDA in the kernel), so the logits are read once.
    T != 1: z = float32(x) / T in fp32. bf16 / fp16 logits are first upcast INTO out (copy_, exact, no
    temporary), then divided there in place by the fp32 column; fp32 logits are divided straight into out.
    """
    xc = x[r0:r1, :w]
    if temp is None:
        if shift is None:
            shift = xc.amax(dim=1).float()
        return torch.sub(xc, shift[:, None], out=out), shift
    if xc.dtype == torch.float32:
        torch.div(xc, temp[r0:r1], out=out)                 # z = x / T, fp32 throughout
    else:
        out.copy_(xc).div_(temp[r0:r1])                     # z = float32(x), then / T in fp32
    if shift is None:
        shift = out.amax(dim=1)
    return out.sub_(shift[:, None]), shift


def _local_stats(x, w, temp, rows, entropy, topk=0):
    """One pass over this shard's real columns, no communication.

    Per token: m_r = max_v z_v, s_r = sum_v exp(z_v - m_r), q_r = sum_v exp(z_v - m_r) (z_v - m_r)
    (entropy only), and the local top-k of z (taken on the raw logits: z is monotone in them). A shard
    with no real column (w == 0) reports m_r = -inf.
    """
    n, dev, f32 = x.shape[0], x.device, torch.float32
    m = torch.full((n,), -math.inf, dtype=f32, device=dev)
    s = torch.zeros(n, dtype=f32, device=dev)
    q = torch.zeros(n, dtype=f32, device=dev) if entropy else None
    kk = min(topk, w)
    tv = torch.full((n, topk), -math.inf, dtype=f32, device=dev) if topk else None
    ti = torch.zeros((n, topk), dtype=torch.int64, device=dev) if topk else None
    if w == 0 or n == 0:
        return m, s, q, tv, ti
    buf = torch.empty(min(rows, n), w, dtype=f32, device=dev)
    ebuf = torch.empty(min(rows, n), w, dtype=f32, device=dev) if entropy else None
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        if kk:
            v, ti[r0:r1, :kk] = x[r0:r1, :w].topk(kk, dim=1)
            tv[r0:r1, :kk] = _scale(v, temp, r0, r1)
        t, m[r0:r1] = _shifted(x, r0, r1, w, buf[: r1 - r0], temp)
        if entropy:
            e = torch.exp(t, out=ebuf[: r1 - r0])
            s[r0:r1] = e.sum(dim=1)
            q[r0:r1] = t.mul_(e).sum(dim=1)            # sum e * t in place: no [chunk, W] temporary
        else:
            s[r0:r1] = t.exp_().sum(dim=1)
    return m, s, q, tv, ti


def _global_lse(group, w, m_loc, s_loc, q_loc, extra):
    """Combine the shards: 2 all-reduces, MAX of m [N], then SUM of [N, 1 (+1) + K] packed columns.

    With m = max_r m_r: s = sum_r s_r e^{m_r - m}, q = sum_r e^{m_r - m} (q_r + (m_r - m) s_r), so
    lse = m + log s and the entropy H = lse - E_p[z] = log s - q / s. `extra` [N, K] is summed alongside
    (each id's logit lives on one shard; the others contribute an exact 0).
    """
    m = m_loc.clone()
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    cols = [s_loc] + ([q_loc] if q_loc is not None else [])
    if w == 0:   # no real column here: contribute exact zeros (avoids -inf - m and 0 * inf)
        cols = [torch.zeros_like(c) for c in cols]
    else:
        scale = torch.exp(m_loc - m)
        if q_loc is not None:
            cols[1] = (q_loc + (m_loc - m) * s_loc) * scale
        cols[0] = s_loc * scale
    packed = torch.cat([c[:, None] for c in cols] + [extra], dim=1)
    if group is not None:
        dist.all_reduce(packed, group=group)
    log_s = packed[:, 0].log()
    ent = (log_s - packed[:, 1] / packed[:, 0]) if q_loc is not None else None
    return m, log_s, ent, packed[:, len(cols):]


def _local_ids(ids: torch.Tensor, shard: VocabShard):
    """Global ids [N, K] -> (local column, owned mask); unowned ids point at column 0 (masked out)."""
    owned = (ids >= shard.start) & (ids < shard.start + shard.valid)
    return torch.where(owned, ids - shard.start, 0), owned


class _LogProbs(torch.autograd.Function):
    """log p(ids) [N, K] and entropy H [N] of softmax(z), z = float32(logits) / T, over the sharded vocab.

    Math:   log p_j = z_{id_j} - lse,   lse = log sum_v e^{z_v},   H = -sum_v p_v log p_v
    Grad:   d log p_j / d z_v = 1[v = id_j] - p_v,   dH / d z_v = -p_v (log p_v + H),
            so with G = sum_j g_j:  dL/dz_v = sum_j g_j 1[v = id_j] - p_v (G + g_H (log p_v + H)),
            and dL/dlogits = dL/dz / T. Duplicated ids accumulate (scatter_add).
    Collectives: forward 2 all-reduces, MAX [N] fp32 then SUM [N, 1 + K (+1 with entropy)] fp32
            (plus the [tp, 7] int64 validation all-reduce in the public wrappers); backward NONE: lse
            and H are replicated and every rank receives the full upstream gradient of the replicated
            loss, so each rank's shard gradient is local.
    Memory: saves the logits (a reference, no copy), the local id columns, lse and H; backward
            recomputes p chunk by chunk from the logits rather than keeping a [N, W] softmax alive from
            forward to backward. The gradient is a new [N, W] tensor in the logits' dtype (fp32: computed
            in place there, no work buffer), or, with inplace_backward=True, is written over the logits
            themselves (Megatron's memory saving, and no fresh [N, W] allocation to page in: only when
            nothing reads the logits afterwards; autograd's version counter rejects other saved uses).
    """

    @staticmethod
    def forward(ctx, x, ids, shard, group, temp, entropy, chunk_rows, inplace_backward):
        w = shard.valid
        rows = _rows(x.shape[1], chunk_rows, 2 if entropy else 1, x.device)
        m_loc, s_loc, q_loc, _, _ = _local_stats(x, w, temp, rows, entropy)
        col, owned = _local_ids(ids, shard)
        z_ids = torch.where(owned, _scale(x.gather(1, col), temp), 0.0)
        m, log_s, ent, z_ids = _global_lse(group, w, m_loc, s_loc, q_loc, z_ids)
        lse = m + log_s
        logp = (z_ids - m[:, None]) - log_s[:, None]   # same rounding order as torch.log_softmax
        ctx.save_for_backward(x, col, owned, lse, ent)
        ctx.shard, ctx.temp, ctx.rows, ctx.inplace = shard, temp, rows, inplace_backward
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logp, (ent if entropy else logp.new_zeros(0)), lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_lse):
        x, col, owned, lse, ent = ctx.saved_tensors
        if ent is None or g_ent is None or g_ent.numel() == 0:
            g_ent = None
        if g_lp is None and g_ent is None:
            return (None,) * 8
        n, w, temp, rows, dev = x.shape[0], ctx.shard.valid, ctx.temp, ctx.rows, x.device
        grad = x if ctx.inplace else torch.empty_like(x)
        grad[:, w:].zero_()                               # padding: never any probability, zero gradient
        if n == 0 or w == 0:
            return (grad,) + (None,) * 7
        # the per-row factors, with 1/T folded in (dL/dlogits = dL/dz / T); all fp32 [N, 1]: 1/T from the
        # fp32 column, and p is recomputed as in forward (z = float32(x) / T in fp32, by _shifted)
        inv_t = 1.0 if temp is None else 1.0 / temp
        neg_g = (g_lp.float().sum(dim=1, keepdim=True) if g_lp is not None else torch.zeros(n, 1, device=dev)) * -inv_t
        g_h = g_ent.float()[:, None] * inv_t if g_ent is not None else None
        g_own = torch.where(owned, g_lp.float(), 0.0) * inv_t if g_lp is not None else None
        direct = grad.dtype == torch.float32              # compute in the gradient's own rows
        buf = None if direct else torch.empty(min(rows, n), w, dtype=torch.float32, device=dev)
        ebuf = torch.empty(min(rows, n), w, dtype=torch.float32, device=dev) if g_h is not None else None
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            out = grad[r0:r1, :w] if direct else buf[: r1 - r0]
            t, _ = _shifted(x, r0, r1, w, out, temp, lse[r0:r1])                # log p_v
            if g_h is not None:
                e = torch.exp(t, out=ebuf[: r1 - r0])
                t.add_(ent[r0:r1, None]).mul_(g_h[r0:r1]).sub_(neg_g[r0:r1]).mul_(e).neg_()
            else:                                                               # -p (G + g_H (log p + H))
                t.exp_().mul_(neg_g[r0:r1])                                     # -p G
            if g_own is not None:
                t.scatter_add_(1, col[r0:r1], g_own[r0:r1])                     # + g_j at id_j (owned)
            if not direct:
                grad[r0:r1, :w].copy_(t)
        return (grad,) + (None,) * 7


# ----------------------------------------------------------------------------------------------
# public API


class TokenStats(NamedTuple):
    logprobs: torch.Tensor            # [*, K] log p at the given ids (grad)
    entropy: Optional[torch.Tensor]   # [*] entropy of p (grad), None unless asked for
    lse: torch.Tensor                 # [*] log-sum-exp of the scaled logits (no grad)


def vocab_parallel_token_stats(logits: torch.Tensor, ids: torch.Tensor, shard: VocabShard, group, *,
                               temperature: Temperature = 1.0, entropy: bool = False,
                               chunk_rows: Optional[int] = None, inplace_backward: bool = False,
                               validate: bool = True) -> TokenStats:
    """Log-probs at global ids [*, K] and (optionally) the entropy [*], in ONE pass over the vocabulary.

    The fused form the whole loss uses: one read of the logits forward, one backward pass writing one
    gradient buffer; all-reduces MAX [N] and SUM [N, 1 + K (+1 with entropy)] fp32, i.e. 8 + 4 K bytes
    per token (+4 with entropy) whatever the vocabulary size, plus the [tp, 7] validation all-reduce
    (validate=False skips it: only for callers that already checked the same arguments).
    `ids` [*, K]: any K >= 0, duplicates allowed (their gradients add up); ids on another shard arrive by
    the all-reduce. Gradient flows to `logits` through logprobs and entropy.
    """
    x = (_check_on_all_ranks(group, shard, logits, ids, temperature) if validate
         else logits.view(-1, shard.width))
    lead = logits.shape[:-1]
    temp = _temp_rows(temperature, x.shape[0], x.device)
    ids2 = ids.reshape(x.shape[0], -1).long()
    logp, ent, lse = _LogProbs.apply(x, ids2, shard, group, temp, entropy, chunk_rows, inplace_backward)
    return TokenStats(logp.view(*lead, ids2.shape[1]), ent.view(lead) if entropy else None, lse.view(lead))


def vocab_parallel_logprobs(logits: torch.Tensor, target: torch.Tensor, shard: VocabShard, group, *,
                            temperature: Temperature = 1.0, chunk_rows: Optional[int] = None,
                            inplace_backward: bool = False) -> torch.Tensor:
    """log p(target) [*] for target [*] global ids, with gradient.

    Collectives: all-reduce MAX [N] (the max), all-reduce SUM [N, 2] (sum-exp and target logit);
    backward local. (_LogProbs with K = 1.)
    """
    return vocab_parallel_token_stats(logits, target.unsqueeze(-1), shard, group, temperature=temperature,
                                      chunk_rows=chunk_rows, inplace_backward=inplace_backward
                                      ).logprobs.squeeze(-1)


def vocab_parallel_logprobs_at(logits: torch.Tensor, ids: torch.Tensor, shard: VocabShard, group, *,
                               temperature: Temperature = 1.0, chunk_rows: Optional[int] = None,
                               inplace_backward: bool = False) -> torch.Tensor:
    """log p at global ids [*, K] (e.g. the rollout's top-K ids plus the sampled token), with gradient.

    Ids owned by another shard contribute 0 locally and arrive by the all-reduce SUM [N, 1 + K];
    duplicated ids are allowed. Backward local.
    """
    return vocab_parallel_token_stats(logits, ids, shard, group, temperature=temperature,
                                      chunk_rows=chunk_rows, inplace_backward=inplace_backward).logprobs


def vocab_parallel_entropy(logits: torch.Tensor, shard: VocabShard, group, *, temperature: Temperature = 1.0,
                           chunk_rows: Optional[int] = None, inplace_backward: bool = False) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v [*] of the scaled distribution, with gradient -p_v (log p_v + H).

    Collectives: all-reduce MAX [N], all-reduce SUM [N, 2]; backward local.
    """
    empty = torch.zeros(*logits.shape[:-1], 0, dtype=torch.int64, device=logits.device)
    return vocab_parallel_token_stats(logits, empty, shard, group, temperature=temperature, entropy=True,
                                      chunk_rows=chunk_rows, inplace_backward=inplace_backward).entropy


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int, shard: VocabShard, group, *,
                        temperature: Temperature = 1.0, chunk_rows: Optional[int] = None,
                        validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable tokens over the whole vocabulary: (log-probs [*, k] descending, global ids [*, k]).

    No gradient (used under no_grad: `anchor = old` top-K of pi_old, metrics). Each shard takes its local
    top-k in the same pass that computes its log-sum-exp stats; the candidates are exchanged by one
    all-gather of [N, 2k] 4-byte words per rank (fp32 value bits and int32 id), then merged identically
    on every rank. Collectives: all-reduce MAX [N], all-reduce SUM [N, 1], all-gather [N, 2k] (+ validation).
    Padding ids are never returned. Ties are broken by the smaller id among the candidates.
    """
    x = (_check_on_all_ranks(group, shard, logits, None, temperature, topk=k) if validate
         else logits.view(-1, shard.width))
    lead, n, w, dev = logits.shape[:-1], x.shape[0], shard.valid, x.device
    temp = _temp_rows(temperature, n, dev)
    m_loc, s_loc, _, tv, ti = _local_stats(x, w, temp, _rows(x.shape[1], chunk_rows, 1, dev), False, topk=k)
    m, log_s, _, _ = _global_lse(group, w, m_loc, s_loc, None, torch.zeros(n, 0, device=dev))
    gid = (ti + shard.start).to(torch.int32)
    if w < k:   # fewer real columns than k here: those slots hold -inf and are never chosen
        gid[:, w:] = torch.iinfo(torch.int32).max
    words = torch.cat([tv.view(torch.int32), gid], dim=1)                # [N, 2k] int32
    _, tp = _group_info(group)
    if group is not None and tp > 1:
        out = torch.empty(tp * n, 2 * k, dtype=torch.int32, device=dev)
        dist.all_gather_into_tensor(out, words, group=group)
        words = out.view(tp, n, 2 * k).permute(1, 0, 2).reshape(n, tp, 2 * k)
    else:
        words = words.view(n, 1, 2 * k)
    vals = words[..., :k].contiguous().view(torch.float32).reshape(n, -1)
    ids = words[..., k:].reshape(n, -1).long()
    order = ids.argsort(dim=1, stable=True)                                # tie-break: smaller id first
    vals, ids = vals.gather(1, order), ids.gather(1, order)
    top, pos = vals.sort(dim=1, descending=True, stable=True)
    top, ids = top[:, :k], ids.gather(1, pos[:, :k])
    logp = (top - m[:, None]) - log_s[:, None]
    return logp.view(*lead, k), ids.view(*lead, k)
