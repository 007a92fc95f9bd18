"""The vocab-parallel primitives on CUDA tensors, one process, no tensor parallelism (group=None): values
and gradients vs the fp32 single-process reference, outputs on the device (tests/gpu/_device.py).

fp32 and bf16 logits, T = 1.0 and 0.7 (a float, and the same T as a tensor), per-token T, padding
columns (vocabulary 1000 or 257 padded to a multiple of 128, the padding logits set far above the
rest), leading shapes, and explicit chunk_rows next to the device's default. Tolerances:
tests/parallel/_reference.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu._device import check_primitives

pytestmark = pytest.mark.gpu

# (vocab, tokens, K, dtype, temperature, chunk_rows, leading shape)
CASES = [
    (1000, 13, 6, torch.float32, 1.0, None, None),
    (1000, 13, 6, torch.float32, 0.7, None, None),
    (1000, 12, 4, torch.float32, "per-token", 1, (3, 4)),
    (1000, 12, 4, torch.bfloat16, 1.0, None, (3, 4)),
    (1000, 12, 4, torch.bfloat16, 0.7, None, None),
    (1000, 12, 4, torch.bfloat16, ("tensor", 0.7), 5, (3, 4)),
    (257, 7, 3, torch.bfloat16, 0.7, 1, (7,)),      # 255 padding columns, chunks of one token
]


def _id(case):
    vocab, n, k, dtype, t, chunk, _ = case
    return f"V{vocab}-{str(dtype).split('.')[-1]}-T{t}-chunk{chunk}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_primitives_on_the_device_match_the_fp32_reference(case):
    assert check_primitives(1, None, 0, case, seed=CASES.index(case), tag=_id(case)) == 8
