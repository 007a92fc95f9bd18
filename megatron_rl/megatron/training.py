"""Training wrappers: Float16Module (bf16), DDP with the distributed optimizer, gradient clipping.

    chunks, optimizer = build_training(model_cfg, ps, OptimConfig(lr=1e-5, bf16=True))
    chunks, optimizer = build_training(model_cfg, ps, optim, recompute="selective")   # less activation memory
    chunks, optimizer = build_training(model_cfg, ps, optim, use_te=use_te)   # layer spec: give
                                                      # step.Actor the same use_te (model.resolve_use_te)

`chunks` is the list of model chunks megatron's schedules take (one chunk: no virtual pipeline).
Hooks megatron's schedule needs are set on the TransformerConfig here, once: no_sync (gradient
accumulation across microbatches), finalize_model_grads (DP reduce-scatter / all-reduce, tied
embedding gradients across the first and last pipeline stages) and the loss scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_rl.model_config import ModelConfig

from .model import build_model
from .parallel import ParallelState


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0              # max global grad norm; 0 disables clipping
    bf16: bool = False                  # bf16 params (Float16Module) with fp32 main params and grads
    use_distributed_optimizer: bool = True
    bucket_size: Optional[int] = None   # DDP bucket (elements); None = megatron's default

    def __post_init__(self):
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"OptimConfig.{name}: got {v!r}; allowed: a number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"OptimConfig.{name}: got {v!r}; allowed: 0 <= value < 1")


def wrap_model(model: torch.nn.Module, ps: ParallelState, cfg: OptimConfig):
    """Float16Module (when bf16) inside megatron's DDP; returns the DDP module."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = model.config
    if cfg.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer, check_for_nan_in_grad=False,
        bucket_size=cfg.bucket_size, average_in_collective=False)
    ddp = DistributedDataParallel(config, ddp_config, model, pg_collection=_ddp_groups(ps))
    ddp.broadcast_params()   # identical replicas whatever each rank initialised
    return ddp


def _ddp_groups(ps: ParallelState):
    """The groups DDP needs, from the bundle (megatron's own helper varies between versions)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection()
    src = ps.pg_collection
    for name in ("tp", "pp", "cp", "dp", "dp_cp", "mp", "embd", "pos_embd", "tp_cp", "intra_dp_cp",
                 "expt_dp", "intra_expt_dp", "ep", "expt_tp", "tp_ep", "tp_ep_pp", "inter_dist_opt"):
        if hasattr(src, name):
            setattr(pgs, name, getattr(src, name))
    return pgs


def build_optimizer(chunks: list, ps: ParallelState, cfg: OptimConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ocfg = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.bf16, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer, log_num_zeros_in_grad=False)
    return get_megatron_optimizer(ocfg, chunks)


def build_training(model_cfg: ModelConfig, ps: ParallelState, cfg: OptimConfig,
                   init: Optional[Callable[[torch.nn.Module], None]] = None, *, recompute: str = "none",
                   sequence_parallel: bool = False, use_te: Optional[bool] = None):
    """(model chunks [DDP], optimizer) for this rank. `init(model)` runs on the bare model first.
    `recompute` / `sequence_parallel`: activation memory options of the model (see model.transformer_config).
    `use_te`: the layer spec (model.resolve_use_te; None = TE exactly when CUDA and transformer_engine are
    there); the step.Actor running these chunks must be given the same value."""
    from megatron.core.distributed import finalize_model_grads

    model = build_model(model_cfg, ps, bf16=cfg.bf16, recompute=recompute, sequence_parallel=sequence_parallel,
                        use_te=use_te)
    if init is not None:
        init(model)
    ddp = wrap_model(model, ps, cfg)
    chunks = [ddp]
    optimizer = build_optimizer(chunks, ps, cfg)
    config = model.config
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return chunks, optimizer


def unwrap(chunk) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module."""
    m = chunk
    while hasattr(m, "module"):
        m = m.module
    return m


def zero_grads(chunks: list, optimizer) -> None:
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
