"""The process group and the parallel-state bundle: the one place that reads megatron-core's global
`parallel_state`.

    started = init_world()        # torchrun's env:// world, or a world of one (the trainer, the converters)
    ps = initialize_parallel(tp=2, pp=1, cp=1, model_cfg=cfg)
    value = agree(check, lambda failures: ValueError(f"rank {failures[0].rank}: {failures[0]}"))
                                  # if `check` raised on any rank, every rank raises

Library code receives a `ParallelState` and uses its groups and ranks; nothing else in megatron_rl
calls `parallel_state.get_*`. megatron-core itself still reads its globals in places (schedules,
DDP), which is why `initialize_parallel` goes through `initialize_model_parallel` rather than
building groups by hand.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from megatron_rl.patches import megatron_cpu


def process_group_backend() -> str:
    """The default group's backend: gloo on CPU; on GPU NCCL for CUDA tensors AND gloo for CPU tensors.
    Our own small control collectives (flags, counters, stop requests, object broadcasts of the loop)
    run on CPU tensors, which a plain "nccl" group rejects ("No backend type associated with device
    type cpu"); megatron-core's groups inherit both from the default group."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits (MEGATRON_RL_TIMEOUT_MIN, default 30 minutes): a dead rank must not hang
    the others forever; the timeout error names the collective and the rank that raised it."""
    return datetime.timedelta(minutes=int(os.environ.get("MEGATRON_RL_TIMEOUT_MIN", "30")))


def init_world(export_env: bool = False) -> bool:
    """Start torch.distributed unless it already runs: torchrun's env:// rendezvous when RANK and
    WORLD_SIZE are set, else a world of one on a free loopback port. export_env: a world of one also
    writes MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK, so the processes the trainer starts
    (rollout engines) see the same torchrun-shaped environment as under torchrun; otherwise the
    environment is left as it is. Returns True when this call started the group: the caller then owns its
    teardown."""
    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(process_group_backend(), timeout=collective_timeout())
    else:
        store = loopback_store()
        if export_env:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        dist.init_process_group(process_group_backend(), store=store, rank=0, world_size=1,
                                timeout=collective_timeout())
    return True


def loopback_store() -> "dist.TCPStore":
    """The world-of-one rendezvous store, listening on 127.0.0.1 only. TCPStore(host, ...) as the master
    listens on EVERY interface whatever `host` says (the host is only where clients connect), and this
    torch has no bind-address option; it does take an already listening socket (master_listen_fd), so
    we bind one to loopback ourselves. Binding it here also removes the old pick-a-port-then-rebind race."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # detach(): the store owns the descriptor from here (it closes it with the store)
    return dist.TCPStore("127.0.0.1", port, 1, True, timeout=collective_timeout(), wait_for_workers=False,
                         master_listen_fd=sock.detach())


class Failure(NamedTuple):
    """One rank's failure, as `agree` hands it to the ranks that did not fail."""
    rank: int
    kind: str        # the exception's type name
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


T = TypeVar("T")


def agree(fn: Callable[[], T], others: Callable[[Sequence[Failure]], BaseException], *,
          src: Optional[int] = None) -> T:
    """Run `fn` on every rank (or on global rank `src` only, whose result every rank then receives) and
    make its outcome everyone's: if it raised anywhere, every rank raises, so no rank is left waiting in
    the next collective. A failing rank re-raises its own exception; the others raise
    `others(failures)` (every failing rank, in rank order). Object collectives over the default group:
    for small values (verdicts, plans, manifests), never tensors."""
    result, err = None, None
    if src is None or dist.get_rank() == src:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks
            err = e
    mine = None if err is None else Failure(dist.get_rank(), type(err).__name__, str(err))
    if src is None:
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, mine)
    else:
        box = [(mine, result if err is None else None)]
        dist.broadcast_object_list(box, src=src)
        reports, shared = [box[0][0]], box[0][1]
        result = result if dist.get_rank() == src else shared
    if err is not None:
        raise err
    failures = [f for f in reports if f is not None]
    if failures:
        raise others(failures)
    return result


@dataclass(frozen=True)
class ParallelState:
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    cp_group: Any
    dp_group: Any           # data parallel WITHOUT context parallel
    dp_cp_group: Any        # data x context parallel: where gradients are reduced
    pg_collection: Any      # megatron.core ProcessGroupCollection with the same groups
    seed: int = 1234

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def initialize_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234,
                        model_cfg: Optional[Any] = None) -> ParallelState:
    """Split an already initialised torch.distributed world into TP x CP x DP x PP groups.

    DP is what is left: world_size / (tp * pp * cp). `model_cfg` (a ModelConfig), when given, is
    checked against the layout first, so a bad layout fails here naming the setting. Seeds the
    model-parallel RNG tracker (per TP rank) and the CPU generator.
    """
    for name, size in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                       ("context_parallel_size", cp)):
        if size < 1:
            raise ValueError(f"{name}={size} must be >= 1")
    if model_cfg is not None:   # before touching the world: a bad layout names its setting first
        model_cfg.check_parallel(tp=tp, pp=pp)
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel: call torch.distributed.init_process_group first")
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size={tp} x "
                         f"pipeline_model_parallel_size={pp} x context_parallel_size={cp}")
    megatron_cpu.apply()
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  context_parallel_size=cp)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelState(
        tp=tp, pp=pp, cp=cp, dp=world // (tp * pp * cp),
        tp_rank=mpu.get_tensor_model_parallel_rank(), pp_rank=mpu.get_pipeline_model_parallel_rank(),
        cp_rank=mpu.get_context_parallel_rank(), dp_rank=mpu.get_data_parallel_rank(),
        tp_group=mpu.get_tensor_model_parallel_group(), pp_group=mpu.get_pipeline_model_parallel_group(),
        cp_group=mpu.get_context_parallel_group(), dp_group=mpu.get_data_parallel_group(),
        dp_cp_group=mpu.get_data_parallel_group(with_context_parallel=True),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(), seed=seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
