"""HF <-> Megatron checkpoints, the megatron-core side: build this rank's model, fill it from the
convert mappings, save / load the dist-checkpoint (torch_dist), export back to HF safetensors.

API:

    hf_to_megatron(hf_dir, out_dir, tp=2, pp=1, overwrite=False)     # every rank of the world calls it
    megatron_to_hf(ckpt_dir, out_dir, tp=1, pp=1, overwrite=False, max_shard_size="5GB")
    hf_to_megatron_main(argv) / megatron_to_hf_main(argv)            # argparse CLIs (tools/, `megatron-rl convert`)
    cfg, meta = megatron_rl.convert.read_metadata(ckpt_dir)          # the trainer builds the model from cfg
    load_weights(model, ckpt_dir)                                    # fill a built model (any TP x PP layout)
    for group in iter_hf_groups(model, cfg, ps): ...                 # weight sync: this stage's weights in HF
        # layout, [(hf_name, full tensor)] per Megatron tensor (q/k/v and gate/up stay together); a
        # collective over the TP group; iter_hf_tensors(...) yields the same one tensor at a time
    build(cfg, ps) / fill_from_hf(model, cfg, ps, source) / save_consuming(model, path)   # the pieces

Both conversions run on an initialised process group (torchrun, env://; or the run_ranks harness) whose
size is a multiple of tp * pp; with none, a world of one is started and torn down again. Each rank
reads only the safetensors slices of its own shards (lazy, per tensor, no mmap) and writes only its
shards: peak memory is about the rank's shard plus one tensor. Every input is checked on every rank
before anything is written, and the ranks agree on the outcome, so a bad input fails the same way
everywhere and leaves no output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_rl.convert import (CheckpointError, HFCheckpoint, UnsupportedModelError, check_source,
                                 model_entries, read_metadata, source_dtype, stage_of, to_hf, to_hf_config,
                                 to_megatron, to_model_config, tp_split_dim, weights_dir)
from megatron_rl.convert import layout
from megatron_rl.convert.mapping import global_name
from megatron_rl.convert.safetensors_io import SafetensorsWriter, write_index
from megatron_rl.model_config import ModelConfig

from .model import build_model, layer_offset
from .parallel import ParallelState, agree, destroy_parallel, init_world, initialize_parallel
from .training import unwrap

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------- process group

@contextmanager
def _process_group():
    """Use the caller's process group; else join torchrun's (env://) or start a world of one, torn down
    again at the end."""
    started = init_world()
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def _refused(failures) -> CheckpointError:
    return CheckpointError(f"another rank refused the conversion: {failures[0]}")


def _stage_files(body: Callable[[Path], None], dst: str | Path) -> None:
    """Run `body(staging dir)` on every rank; rank 0 then commits (all succeeded) or removes the staging.

    A rank failing inside a collective of `body` (e.g. the dist-checkpoint save) can still leave the
    others waiting until the process-group timeout: gloo / NCCL collectives cannot be cancelled. The
    staging directory is then left as `.<name>.partial`, which nothing takes for a checkpoint and the
    next run removes."""
    rank = dist.get_rank()
    tmp = agree(lambda: layout.start_staging(dst) if rank == 0 else layout.staging_dir(dst), _refused)
    error = None
    try:
        agree(lambda: body(tmp), lambda failures: RuntimeError(
            f"conversion failed on rank(s) {[f.rank for f in failures]}; no output was written"))
    except Exception as e:  # noqa: BLE001 - raised once the staging is resolved
        error = e

    def resolve():
        if error is not None:
            return layout.abandon(tmp)
        try:
            layout.commit(tmp, dst)
        except Exception as e:  # noqa: BLE001 - the same message on every rank
            raise RuntimeError(f"could not move {tmp} to {dst}: {e}") from e

    # every rank waits for rank 0 to commit or remove the staging: none returns while it is half there
    agree(resolve, lambda failures: RuntimeError(failures[0].message), src=0)
    if error is not None:
        raise error


def _check_world(tp: int, pp: int) -> None:
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tp * pp = {tp * pp}; launch "
                         f"torchrun --nproc-per-node {tp * pp}")


# ------------------------------------------------------------------------------------------- model

@contextmanager
def _without_random_init():
    """Conversion overwrites every parameter, so megatron's random init is pure cost, and on CPU a
    large one: each column / row-parallel weight is drawn as its FULL fp32 master copy on every rank,
    then sliced (tensor_parallel.layers._initialize_affine_weight_cpu). For a 70B model every rank
    would draw all 70B values, and the transient master copy is the rank's largest allocation.
    build_model has no switch for TransformerConfig.perform_initialization, so the config factory it
    calls is wrapped while the model is built. TODO(model.py owner): a build_model(init=False) flag."""
    from . import model as model_module

    factory = model_module.transformer_config

    def uninitialised(*args, **kwargs):
        config = factory(*args, **kwargs)
        config.perform_initialization = False
        return config

    model_module.transformer_config = uninitialised
    try:
        yield
    finally:
        model_module.transformer_config = factory


def build(cfg: ModelConfig, ps: ParallelState):
    """This rank's stage of the model with EVERY parameter in the checkpoint's dtype.

    build_model(params_dtype=...) leaves the norms in fp32 (torch norms ignore params_dtype; training
    casts them through Float16Module); a conversion must store all tensors as the source had them.
    RoPE's inv_freq is a plain attribute, not a buffer, so it stays fp32. The local layer spec even on
    GPU: conversion needs no transformer-engine, and both specs write the same dist-checkpoint keys.
    Parameters are left uninitialised: callers fill every one (fill_from_hf, or load_weights, strict)."""
    with _without_random_init():
        model = build_model(cfg, ps, params_dtype=cfg.dtype, use_te=False)
    return model.to(_DTYPES[cfg.dtype])


# ------------------------------------------------------------------------------------------- HF -> Megatron

def fill_from_hf(model, cfg: ModelConfig, ps: ParallelState, source) -> int:
    """Copy this rank's shard of every parameter from an HF tensor source; returns the tensor count."""
    by_name = {e.mcore: e for e in model_entries(cfg)}
    offset = layer_offset(cfg, ps)
    n = 0
    with torch.no_grad():
        for local, param in unwrap(model).named_parameters():
            entry = by_name.get(global_name(local, offset))
            if entry is None:
                raise RuntimeError(f"no HF mapping for Megatron parameter {global_name(local, offset)}")
            shard = to_megatron(cfg, entry, source, ps.tp_rank, ps.tp)
            if shard.shape != param.shape or shard.dtype != param.dtype:
                raise RuntimeError(f"{entry.mcore}: mapped shard {shard.dtype} {list(shard.shape)} does not fit "
                                   f"the parameter {param.dtype} {list(param.shape)}")
            param.copy_(shard)
            del shard
            n += 1
    return n


def save_consuming(model, weights_path: str | Path) -> None:
    """dist_checkpointing.save of the model's sharded state dict, releasing the model as it goes.

    Why not a plain save: the swiglu factory saves linear_fc1 as two ShardedTensors over views (gate,
    up) of the fused parameter, and megatron's writer (FileSystemWriterAsync.prepare_write_data) clones
    every view, all at once, before writing: about half of the rank's MLP weights copied (~25% of a
    Llama rank's shard) on top of the model. Here each viewed parameter is split into two owned tensors
    and then freed, one parameter at a time, so the save holds the shard plus one tensor. The model's
    parameters are empty afterwards: conversion only.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    model = unwrap(model)
    state = model.sharded_state_dict()
    apply_factories(state)
    owners = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    views: dict[int, list] = {}
    for sh in nested_values(state):
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            storage = sh.data.untyped_storage()
            if storage.nbytes() != sh.data.numel() * sh.data.element_size():
                views.setdefault(storage.data_ptr(), []).append(sh)
    for ptr, shards in views.items():
        for sh in shards:
            sh.data = sh.data.clone()
        if ptr in owners:
            owners[ptr].data = torch.empty(0, dtype=owners[ptr].dtype, device=owners[ptr].device)
    dist_checkpointing.save(state, str(weights_path))


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, *,
                   overwrite: bool = False, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Convert an HF checkpoint to a dist-checkpoint (+ metadata, tokenizer). Call on every rank."""
    with _process_group():
        def preflight():
            src = HFCheckpoint(hf_dir)
            cfg = to_model_config(src.config, source_dtype(src), make_vocab_size_divisible_by)
            cfg.check_parallel(tp=tp, pp=pp)
            check_source(cfg, src, src.names)
            layout.check_target(out_dir, overwrite, src=hf_dir)
            _check_world(tp, pp)
            return src, cfg

        src, cfg = agree(preflight, _refused)

        def body(tmp: Path):
            ps = initialize_parallel(tp=tp, pp=pp, model_cfg=cfg)
            try:
                model = build(cfg, ps)
                fill_from_hf(model, cfg, ps, src)
                src.close()
                if dist.get_rank() == 0:
                    weights_dir(tmp).mkdir()
                dist.barrier()
                save_consuming(model, weights_dir(tmp))
                if dist.get_rank() == 0:
                    layout.write_metadata(tmp, cfg, src.config, str(hf_dir), tp, pp)
                    layout.copy_side_files(Path(hf_dir), tmp)
            finally:
                destroy_parallel()

        _stage_files(body, out_dir)
        return cfg


# ------------------------------------------------------------------------------------------- Megatron -> HF

def load_weights(model, ckpt_dir: str | Path) -> None:
    """Load a converted checkpoint's weights into a built model (any TP x PP layout: dist-checkpointing
    reshards; vocabulary padding rows differing between layouts are zero-filled / cut)."""
    from megatron.core import dist_checkpointing

    model = unwrap(model)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(weights_dir(ckpt_dir)))
    model.load_state_dict(state)


def gather_tp(tensor: torch.Tensor, ps: ParallelState) -> list[torch.Tensor]:
    """All TP ranks' shards of a tensor, in TP rank order (collective over the TP group)."""
    if ps.tp == 1:
        return [tensor]
    tensor = tensor.detach().contiguous()  # gloo sends wrong data for non-contiguous inputs
    out = [torch.empty_like(tensor) for _ in range(ps.tp)]
    dist.all_gather(out, tensor, group=ps.tp_group)
    return out


def iter_hf_groups(model, cfg: ModelConfig, ps: ParallelState) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This pipeline stage's weights in HF layout, one Megatron tensor at a time: each item is the list
    of (HF name, full tensor) made from one Megatron tensor, so fused groups stay together (q, k, v;
    gate, up), which a vLLM weight update needs in one bucket. HF order; tensors on the parameters'
    device. Collective over the TP group: every TP rank of the stage must iterate to the end. The tied
    output layer's copy on the last stage is skipped (HF ties lm_head to the embedding). Works on the
    local and the transformer-engine layer specs, bare or wrapped (DDP, Float16Module)."""
    offset = layer_offset(cfg, ps)
    params = {global_name(n, offset): p for n, p in unwrap(model).named_parameters()}
    for entry in model_entries(cfg):
        if not entry.export or stage_of(cfg, entry, ps.pp) != ps.pp_rank:
            continue
        param = params.get(entry.mcore)
        if param is None:
            raise RuntimeError(f"stage {ps.pp_rank} lacks parameter {entry.mcore}")
        shards = [param.detach()] if tp_split_dim(entry) is None else gather_tp(param, ps)
        group = to_hf(cfg, entry, shards)
        del shards  # the gathered shards go before the consumer runs: one full tensor held, not two
        yield group


def iter_hf_tensors(model, cfg: ModelConfig, ps: ParallelState) -> Iterator[tuple[str, torch.Tensor]]:
    """iter_hf_groups flattened: (HF name, full tensor), one at a time (the consumer should drop each
    tensor before asking for the next, as megatron_to_hf does, to hold one at a time)."""
    for group in iter_hf_groups(model, cfg, ps):
        while group:
            yield group.pop(0)


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, *,
                   overwrite: bool = False, max_shard_size: str | int = "5GB") -> None:
    """Export a converted checkpoint (megatron_rl_model.json + weights/, as hf_to_megatron writes it, or a
    trainer checkpoint saved in that layout) to HF safetensors. Call on every rank."""
    with _process_group():
        def preflight():
            cfg, meta = read_metadata(ckpt_dir)
            cfg.check_parallel(tp=tp, pp=pp)
            _check_world(tp, pp)
            return cfg, meta

        cfg, meta = agree(preflight, _refused)
        ps = initialize_parallel(tp=tp, pp=pp, model_cfg=cfg)
        try:
            model = build(cfg, ps)
            load_weights(model, ckpt_dir)
            export_hf(model, cfg, ps, out_dir, Path(ckpt_dir), meta.get("hf_config"), overwrite=overwrite,
                      max_shard_size=max_shard_size)
        finally:
            destroy_parallel()


def export_hf(model, cfg: ModelConfig, ps: ParallelState, out_dir: str | Path, side_files_from: Path,
              source_hf_config: dict | None = None, *, overwrite: bool = False,
              max_shard_size: str | int = "5GB") -> None:
    """Write a built model (any TP x PP layout, e.g. the trainer's, wrapped or not) as an HF checkpoint:
    sharded safetensors + index, config.json, generation_config.json, and the tokenizer / side files of
    `side_files_from`. Streams: each stage's TP rank 0 (first DP / CP replica) writes its own tensors, one
    at a time, into files whose layout is planned up front. Staged, then renamed: all or nothing.
    Call on every rank."""
    def preflight():
        hf_config = to_hf_config(cfg, source_hf_config)
        layout.check_target(out_dir, overwrite, src=side_files_from)
        return hf_config, layout.export_plan(cfg, ps.pp, layout.parse_size(max_shard_size))

    hf_config, plan = agree(preflight, _refused)
    dtype = _DTYPES[cfg.dtype]

    def body(tmp: Path):
        writers = {}
        try:
            if ps.tp_rank == 0 and ps.dp_rank == 0 and ps.cp_rank == 0:
                for f in plan:
                    if f.stage == ps.pp_rank:
                        writers[f.name] = SafetensorsWriter(tmp / f.name, [(n, dtype, s) for n, s in f.tensors])
            file_of = {n: f.name for f in plan for n, _ in f.tensors}
            for name, tensor in iter_hf_tensors(model, cfg, ps):
                if writers:
                    writers[file_of[name]].write(name, tensor.cpu().to(dtype))
                del tensor
            for w in writers.values():
                w.close()
            if dist.get_rank() == 0:
                if len(plan) > 1:
                    write_index(tmp, [(f.name, [(n, math.prod(s) * dtype.itemsize) for n, s in f.tensors])
                                      for f in plan])
                (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
                copied = layout.copy_side_files(Path(side_files_from), tmp)
                if "generation_config.json" not in copied:
                    layout.write_generation_config(tmp, hf_config)
        finally:
            for w in writers.values():
                w.abort()

    _stage_files(body, out_dir)


# ------------------------------------------------------------------------------------------- CLIs

def _cli(argv, prog: str, description: str, source: tuple[str, str], layout_use: str,
         add_options: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], str]) -> int:
    """The two CLIs' shared shape: a source directory, --out, --tp / --pp (`layout_use`: what they are
    for), the CLI's own options, --overwrite. `run(args)` returns the success line. Bad input is one
    clear line (every rank agreed on it, so rank 0 prints it) and exit status 1."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(source[0], required=True, help=source[1])
    p.add_argument("--out", required=True, help="output directory (must not hold anything unless --overwrite)")
    p.add_argument("--tp", type=int, default=1, help=f"tensor-parallel size to {layout_use} (default 1)")
    p.add_argument("--pp", type=int, default=1, help=f"pipeline-parallel size to {layout_use} (default 1)")
    add_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = p.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        done = run(a)
    except (CheckpointError, UnsupportedModelError, ValueError) as e:
        if rank0:
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    if rank0:
        print(done)
    return 0


def hf_to_megatron_main(argv=None) -> int:
    def run(a) -> str:
        cfg = hf_to_megatron(a.hf_dir, a.out, a.tp, a.pp, overwrite=a.overwrite,
                             make_vocab_size_divisible_by=a.make_vocab_size_divisible_by)
        return f"converted {cfg.family} ({cfg.num_layers} layers, {cfg.dtype}) to {a.out} at TP{a.tp} PP{a.pp}"

    return _cli(argv, "convert_hf_to_megatron",
                "HF checkpoint (Llama 2/3.x, Qwen2/2.5, Qwen3 dense, Mistral; safetensors) -> megatron-core "
                "dist-checkpoint + tokenizer + metadata. Run under torchrun with tp * pp processes to "
                "stream: each rank reads and writes only its shards.",
                ("--hf-dir", "HF checkpoint directory (config.json + safetensors)"), "shard for",
                lambda p: p.add_argument("--make-vocab-size-divisible-by", type=int, default=128), run)


def megatron_to_hf_main(argv=None) -> int:
    def run(a) -> str:
        megatron_to_hf(a.ckpt_dir, a.out, a.tp, a.pp, overwrite=a.overwrite, max_shard_size=a.max_shard_size)
        return f"exported {a.ckpt_dir} to {a.out}"

    return _cli(argv, "convert_megatron_to_hf",
                "Converted (or trained) megatron_rl checkpoint -> HF safetensors (sharded, with index), "
                "config.json, generation_config.json and tokenizer files. Run under torchrun with "
                "tp * pp processes to stream.",
                ("--ckpt-dir", "checkpoint directory holding megatron_rl_model.json"), "load at",
                lambda p: p.add_argument("--max-shard-size", default="5GB",
                                         help="largest safetensors file, e.g. 5GB, 500MB"), run)


__all__ = ["build", "fill_from_hf", "gather_tp", "hf_to_megatron", "hf_to_megatron_main", "iter_hf_groups",
           "iter_hf_tensors",
           "load_weights", "megatron_to_hf", "megatron_to_hf_main", "save_consuming"]
