"""Single-process properties of the vocab-parallel primitives (group=None): memory bound, chunk
independence, in-place backward, a float T and the same T as a tensor agreeing bit for bit, and the
caller's logits left alone. Fast; no process group. Tolerances: tests/parallel/_reference.py."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_rl.parallel import VocabShard, vocab_parallel_logprobs, vocab_parallel_token_stats, vocab_parallel_topk
from tests.parallel._reference import ATOL, RTOL, assert_grad_close, ref_entropy, ref_logp

N, W, V = 64, 4096, 4000


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, W, generator=g) * 3).to(dtype)
    ids = torch.randint(0, V, (N, 5), generator=g)
    return x, ids, VocabShard(0, W, V)


def _temp(spec):
    """A float T, or ("tensor", T): the same T as an fp32 tensor [N]."""
    return torch.full((N,), spec[1]) if isinstance(spec, tuple) else spec


def _allocations(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::") and e.cpu_memory_usage > 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7, ("tensor", 0.7)], ids=["T=1", "T=0.7", "tensor-T=0.7"])
@pytest.mark.parametrize("inplace", [False, True])
def test_bf16_logits_never_upcast_whole_memory_bounded_by_a_chunk(inplace, temperature):
    x, ids, shard = _data(torch.bfloat16)
    chunk_rows = 8
    chunk_bytes = chunk_rows * W * 4                       # one [chunk, W] fp32 buffer
    grad_bytes = N * W * 2                                 # the bf16 gradient itself

    def run():
        xs = (x.clone().requires_grad_(True))
        inp = xs * 1 if inplace else xs
        st = vocab_parallel_token_stats(inp, ids, shard, None, entropy=True, chunk_rows=chunk_rows,
                                        inplace_backward=inplace, temperature=_temp(temperature))
        torch.autograd.grad(st.logprobs.sum() + st.entropy.sum(), inp)

    x_copy_bytes = N * W * 2   # the test's own clone / `* 1` of the logits, outside the function
    sizes = _allocations(run)
    big = [s for s in sizes if s > chunk_bytes]
    assert max(sizes) < N * W * 4, "a full fp32 copy of the logits was allocated"
    assert all(s in (grad_bytes, x_copy_bytes) for s in big), f"allocations beyond one chunk: {big}"
    if temperature != 1.0:
        # z = float32(x) / T is upcast INTO the work buffers (reused across chunks): forward and backward
        # allocate their two [rows, V] fp32 buffers once each, and no per-chunk fp32 temporary of the
        # upcast (T == 1's mixed-dtype sub still makes one on CPU, chunk-sized)
        per_chunk = [s for s in sizes if chunk_bytes // 4 < s <= chunk_bytes]
        assert len(per_chunk) <= 4, f"per-chunk fp32 allocations: {len(per_chunk)} of {per_chunk[:3]} bytes"


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 0.9), (torch.bfloat16, 0.7),
                                               (torch.bfloat16, ("tensor", 0.7))],
                         ids=["fp32-T=0.9", "bf16-T=0.7", "bf16-tensor-T=0.7"])
def test_results_do_not_depend_on_chunking_and_inplace_matches(dtype, temperature):
    x, ids, shard = _data(dtype)
    temp = _temp(temperature)
    outs = []
    for chunk_rows, inplace in ((1, False), (7, False), (None, False), (5, True)):
        base = x.clone().requires_grad_(True)
        xs = base * 1
        st = vocab_parallel_token_stats(xs, ids, shard, None, entropy=True, chunk_rows=chunk_rows,
                                        inplace_backward=inplace, temperature=temp)
        (g,) = torch.autograd.grad((st.logprobs * 0.3).sum() + st.entropy.sum(), base)
        outs.append((st.logprobs.detach(), st.entropy.detach(), g))
        if inplace:
            assert torch.equal(xs.detach(), g), "inplace_backward must leave the gradient in the logits"
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    # against log_softmax(float32(x) / T) of the same (bf16) logits upcast, values and gradient
    xr = x.float().requires_grad_(True)
    ref = ref_logp(xr, V, temp)
    torch.testing.assert_close(outs[0][0], ref.gather(1, ids).detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(outs[0][1], ref_entropy(ref).detach(), rtol=RTOL, atol=ATOL)
    (gr,) = torch.autograd.grad((ref.gather(1, ids) * 0.3).sum() + ref_entropy(ref).sum(), xr)
    assert_grad_close(outs[0][2], gr, shard, f"{dtype} T={temperature} grad")


@pytest.mark.parametrize("t", [0.7, 1.0])
def test_bf16_float_temperature_equals_the_same_temperature_as_a_tensor_bitwise(t):
    """A float T and torch.full(T) take the same fp32 path (upcast, then / T in fp32): identical bits, in
    the values, the gradient and the top-K (a float T once divided bf16 logits in bf16: ~1e-1 off)."""
    x, ids, shard = _data(torch.bfloat16)
    res = []
    for temp in (t, torch.full((N,), t)):
        xs = x.clone().requires_grad_(True)
        st = vocab_parallel_token_stats(xs, ids, shard, None, entropy=True, chunk_rows=3, temperature=temp)
        (g,) = torch.autograd.grad((st.logprobs * 0.3).sum() + st.entropy.sum(), xs)
        vals, top = vocab_parallel_topk(x, 5, shard, None, temperature=temp, chunk_rows=3)
        res.append((st.logprobs, st.entropy, st.lse, g, vals, top))
    for name, a, b in zip(("logprobs", "entropy", "lse", "grad", "topk values", "topk ids"), *res):
        assert torch.equal(a, b), f"T={t}: {name} differ between a float and a tensor temperature"


def test_caller_logits_untouched_and_inplace_on_shared_logits_is_caught():
    x, ids, shard = _data()
    xs = x.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(xs, ids[:, 0], shard, None)
    lp.sum().backward()
    assert torch.equal(xs.detach(), x)
    # in-place backward while another node still needs the logits: autograd refuses, never silently wrong
    base = x.clone().requires_grad_(True)
    y = base * 1
    other = (y * y).sum()                                   # saves y for its own backward
    lp = vocab_parallel_logprobs(y, ids[:, 0], shard, None, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + other).backward()


def test_non_viewable_logits_are_refused_not_copied():
    x, ids, shard = _data()
    xt = x.view(8, 8, W).transpose(0, 1)                   # leading dims cannot flatten without a copy
    with pytest.raises(ValueError, match="flatten by a view"):
        vocab_parallel_logprobs(xt, ids[:, 0].view(8, 8), shard, None)
