"""The chunk policy on the device, at a real vocabulary (Qwen's 151,936, padded to 152,064):

- the default budget is the device type's (vocab_parallel.CHUNK_BYTES / chunk_bytes);
- results with the default chunking (several chunks: the logits are larger than the budget) equal those
  with chunk_rows=1 and chunk_rows=N, values and gradients, and all of them equal a float64 reference;
- the memory the vocabulary pass allocates beyond the logits is the gradient plus at most one chunk
  budget (bf16 logits are never upcast whole), measured by the CUDA caching allocator.

Tolerances, at V = 151,936 (not _reference.py's, which are for V ~ 1000): each row sums 152k fp32
terms, so against float64 the log-probs and the entropy carry ~1e-6 relative error (measured on the
CPU: log p 4e-6, entropy 9e-7, gradient 2e-6 absolute). Values rtol 1e-5 / atol 2e-5; fp32 gradients
atol 1e-5; bf16 gradients within one bf16 ulp of the float64 gradient rounded to bf16 (+ atol 1e-5).
Between two chunkings only the reductions' grouping changes: rtol 1e-5 / atol 1e-5, bf16 one ulp.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rl.parallel import VocabShard, vocab_parallel_token_stats
from megatron_rl.parallel import vocab_parallel as vp
from tests.gpu._device import DEVICE, assert_close, assert_on
from tests.parallel._reference import BF16_RTOL, boundary_ids, full_logits, padded

pytestmark = pytest.mark.gpu

V = 151936
VPAD = padded(V, 1)
K = 21                                   # the top-K path: 20 ids + the sampled token
ON_CUDA = DEVICE.type == "cuda"
N = 512 if ON_CUDA else 48               # N * VPAD * 4 = 311 MB > the 256 MiB CUDA budget: >1 chunk
VAL_TOL = dict(rtol=1e-5, atol=2e-5)
GRAD_ATOL = 1e-5


def test_the_default_budget_is_the_device_types():
    assert vp.chunk_bytes(DEVICE) == vp.CHUNK_BYTES[DEVICE.type]
    assert vp.chunk_bytes("cuda") == vp.chunk_bytes(torch.device("cuda", 0)) == vp.CHUNK_BYTES["cuda"]
    assert vp.chunk_bytes("cpu") == vp.CHUNK_BYTES["cpu"]
    assert vp.CHUNK_BYTES["cuda"] > vp.CHUNK_BYTES["cpu"]   # launch-bound chunks on a GPU: docs/gpu.md


def _run(x, ids, w, w_ent, temperature, chunk_rows):
    xs = x.clone().requires_grad_(True)
    st = vocab_parallel_token_stats(xs, ids, VocabShard(0, VPAD, V), None, entropy=True,
                                    temperature=temperature, chunk_rows=chunk_rows)
    (g,) = torch.autograd.grad((st.logprobs * w).sum() + (st.entropy * w_ent).sum(), xs)
    assert_on(DEVICE, f"chunk_rows={chunk_rows}", st.logprobs, st.entropy, st.lse, g)
    return st.logprobs.detach(), st.entropy.detach(), st.lse, g


def _reference64(x, ids, w, w_ent, temperature):
    """log_softmax in float64 of float32(x) / T over the real vocabulary, and its gradient."""
    xr = x.double().requires_grad_(True)
    z = xr[:, :V].float().double() / temperature
    L = torch.log_softmax(z, dim=-1)
    lp, ent = L.gather(1, ids), -(L.exp() * L).sum(-1)
    (g,) = torch.autograd.grad((lp * w.double()).sum() + (ent * w_ent.double()).sum(), xr)
    return lp.detach(), ent.detach(), torch.logsumexp(z, dim=-1).detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_chunking_equals_one_row_and_one_chunk_and_the_float64_reference(dtype):
    budget_rows = vp.chunk_bytes(DEVICE) // (4 * VPAD)
    if ON_CUDA:
        assert N > budget_rows // 2, "the default must split this batch into several chunks"
    x = full_logits(N, V, VPAD, seed=3, dtype=dtype).to(DEVICE)
    ids = boundary_ids(N, K, V, VPAD, seed=4).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    w, w_ent = torch.randn(N, K, generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)
    t = 0.7
    default = _run(x, ids, w, w_ent, t, None)
    for chunk_rows in (1, N):
        other = _run(x, ids, w, w_ent, t, chunk_rows)
        for name, a, b in zip(("logprobs", "entropy", "lse", "grad"), other, default):
            tol = dict(rtol=BF16_RTOL, atol=1e-5) if a.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
            assert_close(a, b, f"{dtype} chunk_rows={chunk_rows} vs default: {name}", **tol)
    ref = _reference64(x, ids, w, w_ent, t)
    for name, a, b in zip(("logprobs", "entropy", "lse"), default[:3], ref[:3]):
        assert_close(a, b, f"{dtype} default vs float64: {name}", **VAL_TOL)
    grad, r_grad = default[3], ref[3]
    assert (grad[:, V:] == 0).all(), "padding columns got a gradient"
    if dtype == torch.bfloat16:
        assert_close(grad, r_grad.to(torch.bfloat16), f"{dtype} grad vs float64", rtol=BF16_RTOL, atol=GRAD_ATOL)
    else:
        assert_close(grad, r_grad, f"{dtype} grad vs float64", rtol=1e-5, atol=GRAD_ATOL)


# per-token vectors ([N, K] fp32 / int64: < 1 MiB) and the caching allocator's granularity: a large block
# keeps an unsplit remainder below 1 MiB, a new segment is rounded up to 2 MiB (the 3 big tensors here)
SLACK = 16 * 2**20


@pytest.mark.skipif(not ON_CUDA, reason="measures the CUDA caching allocator")
@pytest.mark.parametrize("chunk_rows", [None, 16], ids=["default", "chunk16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T=1", "T=0.7"])
def test_memory_beyond_the_logits_is_the_gradient_plus_one_chunk_budget(temperature, inplace, chunk_rows):
    n = 1024                                                   # 311 MB of bf16 logits, 2.3 budgets of fp32
    x = (torch.randn(n, VPAD, device=DEVICE) * 3).to(torch.bfloat16)
    ids = torch.randint(0, V, (n, K), device=DEVICE)
    w = torch.randn(n, K, device=DEVICE)
    base = x.requires_grad_(True)
    inp = base * 1 if inplace else base                        # in-place backward needs a non-leaf
    budget = vp.chunk_bytes(DEVICE) if chunk_rows is None else chunk_rows * VPAD * 4
    grad_bytes = 0 if inplace else n * VPAD * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    st = vocab_parallel_token_stats(inp, ids, VocabShard(0, VPAD, V), None, entropy=True,
                                    temperature=temperature, chunk_rows=chunk_rows, inplace_backward=inplace)
    (g,) = torch.autograd.grad((st.logprobs * w).sum() + st.entropy.sum(), inp)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert (g.data_ptr() == inp.data_ptr()) == inplace
    bound = grad_bytes + budget + SLACK
    assert extra <= bound, (f"peak {extra / 2**20:.0f} MiB beyond the logits > gradient {grad_bytes / 2**20:.0f} "
                            f"+ budget {budget / 2**20:.0f} + {SLACK / 2**20:.0f} MiB")
    assert extra < n * VPAD * 4, "a whole fp32 copy of the logits was allocated"
