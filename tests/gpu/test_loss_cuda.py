"""The whole loss (vocab_parallel_policy_loss) on CUDA logits, one process, group=None (tp 1).

Every configuration of tests/parallel/test_loss.py (every registered mode, then binary / top-K DPPO,
CPPO with fixed and p90 budgets and both horizons, exact divergences, anchor=old, entropy and KL terms,
per-token and float T, bf16, seq_first), on its packed batch (3 sequences, cu_seqlens, prompt tokens
masked): loss, metrics and gradient are on the device, equal to the unsharded fp32 reference
(test_loss._reference), and equal to the same call on the CPU. Also: in-place backward and the chunk
size change nothing on the device. Tolerances: tests/parallel/_reference.py (values and fp32 gradients
rtol 1e-5 / atol 1e-6; bf16 gradients one bf16 ulp).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rl.losses import LossConfig
from megatron_rl.parallel import vocab_parallel_policy_loss
from tests.gpu._device import (DEVICE, assert_close, assert_loss_close, check_loss, counts_of, loss_on,
                               to_device)
from tests.parallel import test_loss as tl
from tests.parallel._reference import padded

pytestmark = pytest.mark.gpu

CONFIGS = tl._configs()


@pytest.mark.parametrize("name,cfg,opts", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_whole_loss_on_the_device_equals_the_reference_and_the_cpu_call(name, cfg, opts):
    check_loss(1, None, 0, name, cfg, opts)


CHUNK_CONFIGS = [c for c in CONFIGS if c[0] in ("dppo_binary_tv", "dppo_topk_tv", "cppo topk_tv bf16 T=0.7",
                                                "dppo_topk_tv seq_first b=2 entropy metric per-token T")]


@pytest.mark.parametrize("name,cfg,opts", CHUNK_CONFIGS, ids=[c[0] for c in CHUNK_CONFIGS])
def test_whole_loss_on_the_device_does_not_depend_on_chunk_rows(name, cfg, opts):
    x_full, x, shard, temp, rollout = tl._batch(padded(tl.VOCAB, 1), 1, None, 0, opts, cfg)
    counts = counts_of(rollout)
    default = loss_on(DEVICE, x, rollout, cfg, counts, shard, None, temp, opts)
    for chunk_rows in (1, 7, x.shape[0]):
        other = loss_on(DEVICE, x, rollout, cfg, counts, shard, None, temp, opts, chunk_rows=chunk_rows)
        assert_loss_close(other, default, shard, f"[{name}] chunk_rows={chunk_rows} vs default")


def test_whole_loss_inplace_backward_on_the_device_leaves_the_same_gradient_in_the_logits():
    """What the Megatron step runs (policy_loss_fn passes inplace_backward=True), on the device: the same
    loss and gradient, the gradient written into the logits' own storage."""
    cfg = LossConfig(mode="cppo", divergence="topk_tv", topk=tl.K, entropy_coef=0.02)
    for dtype in (torch.float32, torch.bfloat16):
        x_full, x, shard, temp, rollout = tl._batch(padded(tl.VOCAB, 1), 1, None, 0,
                                                    {"temperature": 0.8, "dtype": dtype}, cfg)
        rollout_d = to_device(rollout)
        out = {}
        for inplace in (False, True):
            xs = x.to(DEVICE).requires_grad_(True)
            logits = xs * 1.0                       # a non-leaf, like the output layer's output
            loss, _ = vocab_parallel_policy_loss(logits, rollout_d, cfg, counts_of(rollout), shard, None,
                                                 temperature=temp, inplace_backward=inplace)
            (g,) = torch.autograd.grad(loss, logits)
            assert (g.data_ptr() == logits.data_ptr()) == inplace
            assert g.device.type == DEVICE.type and g.dtype == dtype
            out[inplace] = (loss.detach(), g)
        # not bitwise on CUDA: index_add_ (the losses' segment sums) and scatter_add_ (a duplicated id's
        # gradients) add atomically, in any order; bitwise on the CPU (tests/parallel/test_loss.py)
        assert_close(out[True][0], out[False][0], f"{dtype} loss in-place vs not")
        assert_close(out[True][1], out[False][1], f"{dtype} grad in-place vs not")
