"""The parallel-state bundle: the one place that reads megatron-core's global `parallel_state`.

Library code receives a `ParallelState` and uses its groups and ranks; nothing else in megatron_rl
calls `parallel_state.get_*`. megatron-core itself still reads its globals in places (schedules,
DDP), which is why `initialize_parallel` goes through `initialize_model_parallel` rather than
building groups by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_rl.patches import megatron_cpu


def process_group_backend() -> str:
    """The default group's backend: gloo on CPU; on GPU NCCL for CUDA tensors AND gloo for CPU tensors.
    Our own small control collectives (flags, counters, stop requests, object broadcasts of the loop)
    run on CPU tensors, which a plain "nccl" group rejects ("No backend type associated with device
    type cpu"); megatron-core's groups inherit both from the default group."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


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

    def describe(self) -> str:
        return (f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp} "
                f"(tp_rank {self.tp_rank}, pp_rank {self.pp_rank}, cp_rank {self.cp_rank}, "
                f"dp_rank {self.dp_rank})")


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
