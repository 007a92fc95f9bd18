import os

import pytest

# Keep BLAS/OpenMP to what a 2-core CI machine has; multi-rank cases set 1 thread per rank.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on machines without it")
    config.addinivalue_line("markers", "slow: end-to-end or multi-minute; runs in CI")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
