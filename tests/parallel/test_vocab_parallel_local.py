"""Single-process properties of the vocab-parallel primitives (group=None): memory bound, chunk
independence, in-place backward, and the caller's logits left alone. Fast; no process group."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_rl.parallel import VocabShard, vocab_parallel_logprobs, vocab_parallel_token_stats
from tests.parallel._reference import ATOL, RTOL, ref_entropy, ref_logp

N, W, V = 64, 4096, 4000


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, W, generator=g) * 3).to(dtype)
    ids = torch.randint(0, V, (N, 5), generator=g)
    return x, ids, VocabShard(0, W, V)


def _allocations(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::") and e.cpu_memory_usage > 0]


@pytest.mark.parametrize("inplace", [False, True])
def test_bf16_logits_never_upcast_whole_memory_bounded_by_a_chunk(inplace):
    x, ids, shard = _data(torch.bfloat16)
    chunk_rows = 8
    chunk_bytes = chunk_rows * W * 4                       # one [chunk, W] fp32 buffer
    grad_bytes = N * W * 2                                 # the bf16 gradient itself

    def run():
        xs = (x.clone().requires_grad_(True))
        inp = xs * 1 if inplace else xs
        st = vocab_parallel_token_stats(inp, ids, shard, None, entropy=True, chunk_rows=chunk_rows,
                                        inplace_backward=inplace)
        torch.autograd.grad(st.logprobs.sum() + st.entropy.sum(), inp)

    x_copy_bytes = N * W * 2   # the test's own clone / `* 1` of the logits, outside the function
    sizes = _allocations(run)
    big = [s for s in sizes if s > chunk_bytes]
    assert max(sizes) < N * W * 4, "a full fp32 copy of the logits was allocated"
    assert all(s in (grad_bytes, x_copy_bytes) for s in big), f"allocations beyond one chunk: {big}"


def test_results_do_not_depend_on_chunking_and_inplace_matches():
    x, ids, shard = _data()
    outs = []
    for chunk_rows, inplace in ((1, False), (7, False), (None, False), (5, True)):
        base = x.clone().requires_grad_(True)
        xs = base * 1
        st = vocab_parallel_token_stats(xs, ids, shard, None, entropy=True, chunk_rows=chunk_rows,
                                        inplace_backward=inplace, temperature=0.9)
        (g,) = torch.autograd.grad((st.logprobs * 0.3).sum() + st.entropy.sum(), base)
        outs.append((st.logprobs.detach(), st.entropy.detach(), g))
        if inplace:
            assert torch.equal(xs.detach(), g), "inplace_backward must leave the gradient in the logits"
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    ref = ref_logp(x, V, 0.9)
    torch.testing.assert_close(outs[0][0], ref.gather(1, ids), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(outs[0][1], ref_entropy(ref), rtol=RTOL, atol=ATOL)


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
