"""Atomic dist-checkpointing of model + optimizer + RNG + step counters; bit-exact resume.

    path = save_checkpoint(root, actor)            # every rank calls it
    path = latest_checkpoint(root)                 # newest COMPLETE checkpoint, or None
    load_checkpoint(path, actor)                   # every rank; raises CheckpointError if invalid

Layout of one checkpoint, `root/iter_0000012/`:
    model + optimizer   megatron dist-checkpointing (torch_dist), sharded by every rank
    rng/rank{r}.pt      this rank's RNG states (CPU generator, model-parallel tracker, python, numpy)
    COMPLETE.json       the completion marker, written last: counters, layout, and sha256 + size of
                        every other file

Atomicity: everything is written into `root/.iter_0000012.tmp/`, files and directories fsynced, the
marker written (and fsynced) last, then the directory is renamed into place (atomic on POSIX) and
the parent fsynced. A crash at any point leaves either no `iter_*` directory or a complete one; a
`.tmp` leftover is never considered and is removed by the next save of that iteration. On load the
marker's checksums are verified (on global rank 0; the verdict is broadcast so every rank fails
alike): a truncated or corrupted checkpoint is refused with CheckpointError naming the file, and any
other checkpoint still loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .parallel import agree
from .training import unwrap

MARKER = "COMPLETE.json"
FORMAT = 1
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}   # layout-independent optimizer state


class CheckpointError(RuntimeError):
    pass


def _name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MARKER)


def _commit(tmp: Path, final: Path) -> None:
    """The one atomic step: a complete temp directory becomes the checkpoint."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _rng_state(actor) -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def _sharded_state(actor, is_loading: bool) -> dict:
    model_sd = unwrap(actor.chunks[0]).sharded_state_dict()
    return {"model": model_sd,
            "optimizer": actor.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                            metadata=dict(_SHARDING))}


def _layout(actor) -> dict:
    ps = actor.ps
    return {"tp": ps.tp, "pp": ps.pp, "cp": ps.cp, "dp": ps.dp}


def save_checkpoint(root: str | os.PathLike, actor, extra: Optional[dict] = None) -> Path:
    """Save `actor` (step.Actor: model chunks, optimizer, counters) at its current iteration.

    `extra` (JSON-serialisable, from rank 0: the trainer's step, data position, config) goes into the
    completion marker, so it is committed atomically with the weights and returned by load_checkpoint."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = dist.get_rank()
    final = root / _name(actor.iteration)
    tmp = root / f".{_name(actor.iteration)}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():
            raise CheckpointError(f"{final} already exists; refusing to overwrite a checkpoint")
        if tmp.exists():
            shutil.rmtree(tmp)          # leftover of a crashed save: never valid
        tmp.mkdir()
    dist.barrier()
    dist_checkpointing.save(_sharded_state(actor, is_loading=False), str(tmp))
    dist.barrier()
    if rank == 0:
        (tmp / "rng").mkdir()
    dist.barrier()
    torch.save(_rng_state(actor), tmp / "rng" / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _fsync_tree(tmp)
        manifest = {"format": FORMAT, "iteration": actor.iteration,
                    "consumed_samples": actor.consumed_samples, "world_size": dist.get_world_size(),
                    "layout": _layout(actor), "extra": extra or {},
                    "files": {f: {"sha256": _sha256(tmp / f), "size": (tmp / f).stat().st_size}
                              for f in _files(tmp)}}
        with open(tmp / MARKER, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _commit(tmp, final)
    dist.barrier()
    return final


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest checkpoint under `root` that carries its completion marker (temp dirs never count)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / MARKER).is_file())
    return done[-1] if done else None


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MARKER} completion marker "
                              f"(the save did not finish); load an earlier checkpoint")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} ({e})") from None
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupted: {rel} is missing")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {rel} has {f.stat().st_size} bytes, "
                                  f"{meta['size']} were written (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: checksum mismatch in {rel}")
    extra = sorted(set(_files(path)) - set(files))
    if extra:
        raise CheckpointError(f"checkpoint {path}: files not in its manifest: {extra[:5]}")
    return manifest


def _verify_everywhere(path: Path) -> dict:
    """Rank 0 verifies; every rank gets the manifest or raises the same error (nobody hangs). All
    ranks must load the same checkpoint: a rank passing another path is refused too."""
    paths = [None] * dist.get_world_size()
    dist.all_gather_object(paths, str(path.resolve()))

    def verify() -> dict:
        if len(set(paths)) != 1:
            raise CheckpointError(f"ranks asked to load different checkpoints: {sorted(set(paths))}")
        return verify_checkpoint(path)

    return agree(verify, lambda failures: CheckpointError(failures[0].message), src=0)


def _ensure_optimizer_state(optimizer) -> None:
    """Without transformer-engine / apex, megatron's optimizer loads INTO existing torch Adam state and
    reads Adam's step from it: create what the first step would (zero moments, step 0) before loading;
    the load then overwrites moments and step."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    # torch Adam keeps `step` on the host unless capturable / fused (what it creates itself)
                    st["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")


def _unshare_adam_steps(optimizer) -> None:
    """megatron restores torch Adam's step as ONE tensor shared by every parameter's state; torch's
    foreach Adam then increments it once per parameter per step and the bias correction drifts. Give
    each parameter its own copy (what a run that never stopped has)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


@torch.no_grad()
def load_checkpoint(path: str | os.PathLike, actor) -> dict:
    """Restore model, optimizer, RNG and counters into `actor` (same layout as saved); returns the
    completion marker (its "extra" holds what save_checkpoint was given)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    manifest = _verify_everywhere(path)
    if manifest["layout"] != _layout(actor) or manifest["world_size"] != dist.get_world_size():
        raise CheckpointError(f"checkpoint {path} was saved with layout {manifest['layout']} on "
                              f"{manifest['world_size']} ranks; this run is {_layout(actor)} on "
                              f"{dist.get_world_size()} ranks (bit-exact resume needs the same layout)")
    _ensure_optimizer_state(actor.optimizer)
    state = dist_checkpointing.load(_sharded_state(actor, is_loading=True), str(path))
    unwrap(actor.chunks[0]).load_state_dict(state["model"], strict=True)
    actor.optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(actor.optimizer)
    _set_rng_state(torch.load(path / "rng" / f"rank{dist.get_rank()}.pt", weights_only=False))
    actor.iteration = int(manifest["iteration"])
    actor.consumed_samples = int(manifest["consumed_samples"])
    dist.barrier()
    return manifest
