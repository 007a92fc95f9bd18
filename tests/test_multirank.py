"""The multi-rank gloo harness itself: collectives work, failures and hangs are reported per rank."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.multirank import MultiRankError, run_ranks


def _allreduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _rank_raises(rank, world_size, bad_rank):
    if rank == bad_rank:
        raise RuntimeError(f"deliberate failure on rank {rank}")
    dist.barrier()  # the other ranks would wait here forever without the harness
    return rank


def _rank_hangs(rank, world_size):
    if rank == 1:
        time.sleep(3600)
    return rank


def _rank_dies(rank, world_size):
    if rank == 0:
        os._exit(7)
    dist.barrier()


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce(world_size):
    values = run_ranks(_allreduce, world_size, timeout=60)
    assert values == [world_size * (world_size + 1) / 2] * world_size


def test_rank_raising_fails_promptly_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(MultiRankError) as err:
        run_ranks(_rank_raises, 3, args=(2,), timeout=120, grace=2)
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert "rank 2 raised" in msg and "deliberate failure on rank 2" in msg
    assert "_rank_raises" in msg  # the traceback, not just the message
    assert elapsed < 60, f"took {elapsed:.0f}s: the failing rank did not end the case promptly"


def test_hang_times_out_and_names_the_rank():
    with pytest.raises(MultiRankError) as err:
        run_ranks(_rank_hangs, 2, timeout=8)
    msg = str(err.value)
    assert "timed out" in msg and "rank 1 still running" in msg and "_rank_hangs" in msg


def test_rank_dying_without_report_is_named():
    with pytest.raises(MultiRankError) as err:
        run_ranks(_rank_dies, 2, timeout=60, grace=2)
    assert "rank 0 died without a report (exit code 7)" in str(err.value)
