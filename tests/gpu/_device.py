"""Shared helpers of tests/gpu: the device under test, moving inputs to it, and the two checks every file
runs (the vocab-parallel primitives, and the whole loss) on logits that live on that device.

DEVICE is CUDA. MRL_GPU_TEST_DEVICE=cpu points the same tests at the CPU: a dry run of the tests' own
logic on a machine without a GPU (tests/gpu/conftest.py lifts the `gpu` skip for it), so a bug in a test
does not cost a GPU run. Device time is scarce (docs/gpu.md), so sizes are small except where a
realistic vocabulary is the point (the chunk policy and the memory bound).

References are the CPU single-process ones of tests/parallel (_reference.py: log_softmax over the real
vocabulary of float32(logits) / T, fp32, from the same logits), compared after moving our results to the
host. Tolerances are that module's (RTOL 1e-5 / ATOL 1e-6 for values and fp32 gradients; bf16
gradients within one bf16 ulp), except where a test states its own: CUDA's sum order and exp / log
differ from the CPU's only at fp32 roundoff, which those bounds already allow for.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_rl.losses import GlobalCounts
from megatron_rl.parallel import (vocab_parallel_entropy, vocab_parallel_logprobs, vocab_parallel_logprobs_at,
                                  vocab_parallel_policy_loss, vocab_parallel_token_stats, vocab_parallel_topk)
from tests.parallel import test_loss as tl
from tests.parallel._reference import (ATOL, BF16_RTOL, RTOL, assert_grad_close, boundary_ids, full_logits, padded,
                                       ref_entropy, ref_logp, shard_of)

DEVICE = torch.device(os.environ.get("MRL_GPU_TEST_DEVICE", "cuda"))


def to_device(obj, device=DEVICE):
    """Tensors (also inside a dict) onto `device`; anything else (None, strings, floats) as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def assert_on(device, what: str, *tensors):
    for t in tensors:
        assert t.device.type == torch.device(device).type, f"{what}: on {t.device}, expected {device}"


def assert_close(ours, ref, what: str, rtol=RTOL, atol=ATOL):
    """Our result (any device) vs a reference (any device), compared on the host."""
    rtol = BF16_RTOL if ours.dtype == torch.bfloat16 and rtol == RTOL else rtol
    torch.testing.assert_close(ours.detach().cpu(), ref.detach().cpu().to(ours.dtype), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def temperature_of(spec, lead):
    """A float T; ("tensor", T): the same T as a tensor of the leading shape; "per-token": distinct T's."""
    if spec == "per-token":
        return torch.linspace(0.6, 1.4, int(torch.tensor(lead).prod())).view(lead)
    if isinstance(spec, tuple):
        return torch.full(lead, spec[1])
    return spec


# ---------------------------------------------------------------------------------------------
# the primitives: values and gradients on DEVICE vs the unsharded fp32 reference on the host


def check_primitives(tp, group, r, case, seed, tag) -> int:
    """Every vocab-parallel function on this rank's shard, on DEVICE: outputs and gradients on DEVICE,
    values and gradients equal to the reference, padding columns with exactly zero gradient, the caller's
    logits untouched. case = (vocab, tokens, K, dtype, temperature spec, chunk_rows, leading shape).
    Returns the number of checks (the multi-rank test counts them: nothing silently skipped)."""
    vocab, n, k, dtype, tspec, chunk, lead = case
    lead = lead or (n,)
    vpad = padded(vocab, tp)
    x_full = full_logits(n, vocab, vpad, seed=seed, dtype=dtype).view(*lead, vpad)
    temp = temperature_of(tspec, lead)
    ids = boundary_ids(n, k, vocab, vpad, seed=100 + seed).view(*lead, k)
    target = ids[..., 1].clone()
    x, shard = shard_of(x_full, vocab, tp, r)
    g = torch.Generator().manual_seed(7 + seed)
    w_ids, w_tgt, w_ent = torch.randn(*lead, k, generator=g), torch.randn(*lead, generator=g), torch.randn(*lead, generator=g)
    kw = dict(temperature=to_device(temp), chunk_rows=chunk)
    xd = x.to(DEVICE)
    ids_d, tgt_d = ids.to(DEVICE), target.to(DEVICE)
    checks = 0

    def leaf():
        return xd.clone().requires_grad_(True)

    def ref_grad(fn):
        xr = x_full.float().requires_grad_(True)
        out = fn(ref_logp(xr, vocab, temp))
        return out, xr

    def grad_check(out_d, weights, xs, ref_out, xr, what):
        (gx,) = torch.autograd.grad((out_d * weights.to(DEVICE)).sum(), xs)
        assert_on(DEVICE, what, out_d, gx)
        assert gx.dtype == xs.dtype, f"{what}: gradient {gx.dtype} for {xs.dtype} logits"
        assert_close(out_d, ref_out, f"{tag} {what}")
        (gr,) = torch.autograd.grad((ref_out * weights).sum(), xr)
        assert_grad_close(gx.cpu(), gr, shard, f"{tag} {what} grad")

    # 1. log p of the target; 2. log p at ids [*, K] (shard boundaries, duplicates); 3. entropy
    xs = leaf()
    ref, xr = ref_grad(lambda L: L.gather(-1, target.unsqueeze(-1)).squeeze(-1))
    grad_check(vocab_parallel_logprobs(xs, tgt_d, shard, group, **kw), w_tgt, xs, ref, xr, "target logp")
    xs = leaf()
    ref, xr = ref_grad(lambda L: L.gather(-1, ids))
    grad_check(vocab_parallel_logprobs_at(xs, ids_d, shard, group, **kw), w_ids, xs, ref, xr, "logp at ids")
    xs = leaf()
    ref, xr = ref_grad(ref_entropy)
    grad_check(vocab_parallel_entropy(xs, shard, group, **kw), w_ent, xs, ref, xr, "entropy")
    checks += 3

    # 4. fused: ids + entropy in one pass (and lse), also with the Megatron-style in-place backward
    z = x_full[..., :vocab].float() / (temp.unsqueeze(-1) if isinstance(temp, torch.Tensor) else temp)
    ref_lse = torch.logsumexp(z, dim=-1)
    for inplace in (False, True):
        base = leaf()
        xs = base * 1 if inplace else base          # in-place needs logits nobody else reads
        before = xs.detach().clone()
        st = vocab_parallel_token_stats(xs, ids_d, shard, group, entropy=True, inplace_backward=inplace, **kw)
        assert_on(DEVICE, f"{tag} fused outputs", st.logprobs, st.entropy, st.lse)
        (gx,) = torch.autograd.grad((st.logprobs * w_ids.to(DEVICE)).sum() + (st.entropy * w_ent.to(DEVICE)).sum(), base)
        xr = x_full.float().requires_grad_(True)
        L = ref_logp(xr, vocab, temp)
        assert_close(st.logprobs, L.gather(-1, ids), f"{tag} fused logp")
        assert_close(st.entropy, ref_entropy(L), f"{tag} fused entropy")
        assert_close(st.lse, ref_lse, f"{tag} fused lse")
        (gr,) = torch.autograd.grad((L.gather(-1, ids) * w_ids).sum() + (ref_entropy(L) * w_ent).sum(), xr)
        assert_on(DEVICE, f"{tag} fused grad", gx)
        assert_grad_close(gx.cpu(), gr, shard, f"{tag} fused grad inplace={inplace}")
        if not inplace:
            assert torch.equal(xs.detach(), before), f"{tag}: the caller's logits were modified"
        checks += 1

    # 5. top-K over the sharded vocabulary (the padding logits, far above the rest, never chosen)
    ref = ref_logp(x_full, vocab, temp)
    for kk in (1, 4, 20):
        vals, top = vocab_parallel_topk(xd, kk, shard, group, **kw)
        assert_on(DEVICE, f"{tag} top-{kk}", vals, top)
        vals, top = vals.cpu(), top.cpu()
        assert ((top >= 0) & (top < vocab)).all(), f"{tag}: top-{kk} returned a padding id"
        assert (top.sort(-1).values.diff(dim=-1) != 0).all(), f"{tag}: top-{kk} repeated an id"
        assert_close(vals, ref.topk(kk, dim=-1).values, f"{tag} top-{kk} values")
        assert_close(ref.gather(-1, top), vals, f"{tag} top-{kk} ids")   # ties: any of the tied ids
        checks += 1
    assert torch.equal(xd.cpu(), x), f"{tag}: top-K modified the caller's logits"
    return checks


# ---------------------------------------------------------------------------------------------
# the whole loss on DEVICE


def counts_of(rollout, segs=tl.SEGS) -> GlobalCounts:
    return GlobalCounts(num_tokens=int(rollout["loss_mask"].sum()), num_sequences=len(segs),
                        max_response_length=tl.L)


def loss_on(device, x, rollout, cfg, counts, shard, group, temp, opts, **kw):
    """vocab_parallel_policy_loss with the logits, rollout and temperature on `device`: (loss, metrics,
    gradient w.r.t. the [N, W] logits), all left on `device`."""
    xs = x.to(device).clone().requires_grad_(True)
    inp = tl._seq_first(xs, 2) if opts.get("seq_first") else xs
    loss, metrics = vocab_parallel_policy_loss(inp, to_device(rollout, device), cfg, counts, shard, group,
                                               temperature=to_device(temp, device),
                                               seq_first=opts.get("seq_first", False),
                                               entropy_metric=opts.get("entropy_metric", False), **kw)
    (gx,) = torch.autograd.grad(loss, xs)
    return loss, metrics, gx


def assert_loss_close(ours, ref, shard, tag):
    """(loss, metrics, grad) vs a reference triple: the same metric keys, values and the shard gradient."""
    loss, metrics, gx = ours
    r_loss, r_metrics, r_grad = ref
    assert_close(loss, r_loss, f"{tag} loss")
    assert set(metrics) == set(r_metrics), f"{tag}: metric keys differ: {set(metrics) ^ set(r_metrics)}"
    for key in r_metrics:
        assert_close(metrics[key], r_metrics[key], f"{tag} metric {key}")
    if r_grad.shape == gx.shape:        # our own call elsewhere: the same [N, W] shard gradient
        assert_close(gx, r_grad, f"{tag} grad")
    else:                               # the unsharded reference: this shard's columns of it
        assert_grad_close(gx.cpu(), r_grad, shard, f"{tag} grad")


def check_loss(tp, group, r, name, cfg, opts) -> None:
    """One config at one TP size, logits on DEVICE: loss, metrics and shard gradient on DEVICE and equal
    to the unsharded single-process reference (tests/parallel/test_loss._reference) and, at tp 1, to the
    same call on the CPU; identical loss on every rank of the group."""
    x_full, x, shard, temp, rollout = tl._batch(padded(tl.VOCAB, tp), tp, group, r, opts, cfg)
    counts = counts_of(rollout)
    tag = f"{DEVICE.type} tp={tp} rank={r} [{name}]"
    dev = loss_on(DEVICE, x, rollout, cfg, counts, shard, group, temp, opts)
    loss, metrics, gx = dev
    assert_on(DEVICE, f"{tag} loss, metrics, grad", loss, gx, *metrics.values())
    ref = tl._reference(x_full, rollout, cfg, counts, temp, opts.get("entropy_metric", False))
    assert ref[2].abs().max() > 0, f"{tag}: degenerate case, zero gradient"
    assert_loss_close(dev, ref, shard, f"{tag} vs reference")
    if tp == 1 and DEVICE.type != "cpu":
        assert_loss_close(dev, loss_on("cpu", x, rollout, cfg, counts, shard, group, temp, opts), shard,
                          f"{tag} vs the CPU call")
    if group is not None:
        both = torch.stack([loss.detach(), loss.detach()]).cpu()
        dist.all_reduce(both[:1], op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(both[1:], op=dist.ReduceOp.MIN, group=group)
        assert both[0] == both[1], f"{tag}: ranks disagree on the loss {both.tolist()}"
