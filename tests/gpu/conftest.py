"""tests/gpu: every test is marked `gpu`, so tests/conftest.py skips them where CUDA is absent.

MRL_GPU_TEST_DEVICE=cpu runs them anyway, on the CPU (tests/gpu/_device.py points them there): a dry run
of the tests' own logic before a scarce GPU run. Only the skip that tests/conftest.py adds for a missing
CUDA is lifted, and only for tests under this directory; tests that need the CUDA allocator skip
themselves on the CPU.

    MRL_GPU_TEST_DEVICE=cpu python -m pytest -q tests/gpu
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NO_CUDA_REASON = "needs CUDA (marked gpu)"   # tests/conftest.py's reason


@pytest.hookimpl(trylast=True)      # after tests/conftest.py has added its skip
def pytest_collection_modifyitems(config, items):
    if os.environ.get("MRL_GPU_TEST_DEVICE") != "cpu":
        return
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue
        item.own_markers[:] = [m for m in item.own_markers
                               if not (m.name == "skip" and m.kwargs.get("reason") == NO_CUDA_REASON)]
