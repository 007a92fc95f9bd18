"""Vocabulary shards of CUDA logits, tp 2 and 4, on ONE GPU: the primitives and the whole loss.

A lent machine has one GPU, and NCCL refuses two ranks on one device, so the ranks here are 4 gloo
processes (tests/multirank.py) that all hold their shard on the same GPU: gloo reduces CUDA tensors by
staging them through the host. What is tested is the library on CUDA tensors with several shards (the
padding that falls on the last shard, a shard that is all padding, ids on shard boundaries, the top-K
all-gather, the exact divergences' all-gather), not NCCL; the real multi-GPU path (NCCL for CUDA
tensors, gloo for the validation facts) needs 2+ GPUs. Each rank checks its own shard against the
unsharded fp32 reference (tests/gpu/_device.py; tolerances tests/parallel/_reference.py), and the test
checks that every rank ran every check.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu._device import check_loss, check_primitives
from tests.multirank import run_ranks
from tests.parallel import test_loss as tl
from tests.parallel._reference import tp_groups

pytestmark = pytest.mark.gpu

# (vocab, tokens, K, dtype, temperature, chunk_rows, leading shape)
CASES = [
    (1000, 13, 6, torch.float32, 1.0, None, None),     # tp=4: the last shard partly padding
    (300, 9, 5, torch.float32, 0.7, 4, None),          # tp=4: rank 3's shard is ALL padding
    (1000, 12, 4, torch.bfloat16, 0.7, None, (3, 4)),
    (1000, 12, 4, torch.bfloat16, "per-token", 1, None),
]
LOSS_NAMES = ("dppo_binary_tv", "dppo_topk_tv", "cppo", "cppo topk_tv bf16 T=0.7",
              "dppo_exact_kl seq_first b=2 per-token T")
LOSS_CONFIGS = [c for c in tl._configs() if c[0] in LOSS_NAMES]


def _body(rank, world):
    groups = tp_groups(world, sizes=(2, 4))
    done = []
    for tp in (2, 4):
        group, r = groups[tp]
        for i, case in enumerate(CASES):
            done.append((tp, f"case {i}", check_primitives(tp, group, r, case, seed=i, tag=f"tp={tp} r={r} case {i}")))
        for name, cfg, opts in LOSS_CONFIGS:
            check_loss(tp, group, r, name, cfg, opts)
            done.append((tp, name, 1))
    return done


def test_primitives_and_whole_loss_on_cuda_shards_tp_2_4():
    assert len(LOSS_CONFIGS) == len(LOSS_NAMES), "a loss config was renamed in tests/parallel/test_loss.py"
    results = run_ranks(_body, 4, timeout=300)
    expect = [(tp, f"case {i}", 8) for tp in (2, 4) for i in range(len(CASES))]
    expect = sorted(expect + [(tp, name, 1) for tp in (2, 4) for name, _, _ in LOSS_CONFIGS])
    assert all(sorted(res) == expect for res in results), results
