"""Atomic dist-checkpointing of model + optimizer + RNG + step counters; bit-exact resume.

    path = save_checkpoint(root, actor)            # every rank calls it
    path = latest_checkpoint(root)                 # newest COMPLETE checkpoint, or None
    load_checkpoint(path, actor)                   # every rank; raises CheckpointError if invalid
    path, manifest, skipped = load_newest(root, actor, on_damaged="error" | "previous")

Layout of one checkpoint, `root/iter_0000012/`:
    model + optimizer   megatron dist-checkpointing (torch_dist), sharded by every rank
    rng/rank{r}.json    this rank's RNG states (CPU generator, model-parallel tracker, python, numpy)
                        as JSON: nothing in it is ever unpickled
    COMPLETE.json       the completion marker, written last: counters, layout, and sha256 + size of
                        every other file

Atomicity: everything is written into `root/.iter_0000012.tmp/`, files and directories fsynced, the
marker written (and fsynced) last, then the directory is renamed into place (atomic on POSIX) and
the parent fsynced. A crash at any point leaves either no `iter_*` directory or a complete one; a
`.tmp` leftover is never considered and is removed by the next save of that iteration. On load the
marker's checksums are verified (on global rank 0; the verdict is broadcast so every rank fails
alike): a truncated or corrupted checkpoint is refused with CheckpointError naming the file, and any
other checkpoint still loads.

Trust: the checksums catch damage, not an attacker (who rewrites COMPLETE.json too). What this module
reads itself is JSON; before megatron / torch read a directory, verify_checkpoint unpickles torch's
`.metadata` with an allow-list of classes and loads each pickled byte item (torch's loader unpickles them
with weights_only=False) and megatron's common.pt with weights_only=True. docs/platform.md
says what remains trusted.

Disk full: a save that fails for lack of space (OSError ENOSPC, torch's "unexpected pos" / "file write
failed", megatron's CheckpointException around either) is refused on every rank with "no space left
on device under <root> (needs ~X GB)", its temp dir removed by every rank; older checkpoints stay.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .parallel import Failure, agree
from .training import unwrap

MARKER = "COMPLETE.json"
FORMAT = 2     # 1: RNG states pickled (rng/rank{r}.pt), refused on load; 2: JSON
ON_DAMAGED = ("error", "previous")
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}   # layout-independent optimizer state


class CheckpointError(RuntimeError):
    pass


class DamagedCheckpointError(CheckpointError):
    """The checkpoint's files do not verify (missing, truncated, corrupted, unsafe): on_damaged decides
    whether an older one is tried. Other CheckpointErrors (a layout mismatch) never fall back."""


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


# RNG states are byte tensors, int tuples and numpy arrays: JSON holds them exactly (ints; the one float,
# numpy's cached gaussian, round-trips through repr). JSON, not pickle: loading executes nothing.
_RNG_DTYPES = {"uint8": torch.uint8, "int64": torch.int64}


def _tensor_json(t: torch.Tensor) -> dict:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _RNG_DTYPES:
        raise CheckpointError(f"RNG state tensor of dtype {t.dtype} is not supported")
    return {"dtype": dtype, "data": t.detach().cpu().reshape(-1).tolist()}


def _json_tensor(d: dict) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=_RNG_DTYPES[d["dtype"]])


def _rng_to_json(state: dict) -> dict:
    out = {"torch": _tensor_json(state["torch"]),
           "python": [state["python"][0], list(state["python"][1]), state["python"][2]],
           "tracker": {name: _tensor_json(t) for name, t in state["tracker"].items()}}
    if "cuda" in state:
        out["cuda"] = _tensor_json(state["cuda"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        out["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)]
    return out


def _rng_from_json(d: dict) -> dict:
    version, internal, gauss = d["python"]
    state = {"torch": _json_tensor(d["torch"]), "python": (int(version), tuple(int(x) for x in internal), gauss),
             "tracker": {str(name): _json_tensor(t) for name, t in d["tracker"].items()}}
    if "cuda" in d:
        state["cuda"] = _json_tensor(d["cuda"])
    if "numpy" in d:
        import numpy as np
        kind, keys, pos, has_gauss, gauss_n = d["numpy"]
        state["numpy"] = (str(kind), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss_n))
    return state


def _read_rng(path: Path) -> dict:
    """This rank's RNG states; CheckpointError (never an unpickle) for anything but our JSON."""
    try:
        return _rng_from_json(json.loads(path.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:   # UnicodeDecodeError is a ValueError
        raise DamagedCheckpointError(f"checkpoint {path.parent.parent}: {path.name} is not a valid RNG state "
                                     f"file ({type(e).__name__}: {e}); it is read as JSON only") from None


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
    completion marker, so it is committed atomically with the weights and returned by load_checkpoint.
    A failed save (disk full or any other error) leaves no temp dir and every older checkpoint intact."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = dist.get_rank()
    final = root / _name(actor.iteration)
    tmp = root / f".{_name(actor.iteration)}.tmp"
    state = _sharded_state(actor, is_loading=False)
    needed = _needed_bytes(root, state)

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():
            raise CheckpointError(f"{final} already exists; refusing to overwrite a checkpoint")
        if tmp.exists():
            shutil.rmtree(tmp)          # leftover of a crashed save: never valid
        free = shutil.disk_usage(root).free
        if free < needed:               # refuse before writing: a write that fills the disk is slower to fail
            raise OSError(errno.ENOSPC, f"{free / 1e9:.2f} GB free, ~{needed / 1e9:.2f} GB needed", str(root))
        tmp.mkdir()

    def write_rng():
        (tmp / "rng").mkdir(exist_ok=True)
        _write_synced(tmp / "rng" / f"rank{rank}.json", json.dumps(_rng_to_json(_rng_state(actor))))

    def commit():
        _fsync_tree(tmp)
        manifest = {"format": FORMAT, "iteration": actor.iteration,
                    "consumed_samples": actor.consumed_samples, "world_size": dist.get_world_size(),
                    "layout": _layout(actor), "extra": extra or {},
                    "files": {f: {"sha256": _sha256(tmp / f), "size": (tmp / f).stat().st_size}
                              for f in _files(tmp)}}
        _write_synced(tmp / MARKER, json.dumps(manifest, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        _commit(tmp, final)

    def refused(failures):
        return CheckpointError(f"saving {final.name} failed on rank {failures[0].rank}: {failures[0].message}")

    wrote = False
    try:
        agree(prepare, refused, src=0)
        wrote = True
        # collective inside: torch's writer gathers every rank's write errors and raises them on all
        # ranks (CheckpointException, a BaseException), so no rank is left waiting after a failed write
        dist_checkpointing.save(state, str(tmp))
        dist.barrier()
        agree(write_rng, refused)
        agree(commit, refused, src=0)
    except (Exception, _dcp_exception()) as e:   # noqa: BLE001 - every failure must clean up
        # every failure above reaches every rank (agree; torch's writer), so collectives are safe here.
        # torch tells only the failing rank why: the others learn "disk full" from this reduction
        full = torch.tensor([int(_disk_full(e))], dtype=torch.int64, device="cpu")
        dist.all_reduce(full, op=dist.ReduceOp.MAX)
        if wrote:
            shutil.rmtree(tmp, ignore_errors=True)   # every rank: a rank-local tmp dir goes too
            dist.barrier()
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)   # what a concurrent removal left behind
            dist.barrier()
        if full:
            raise CheckpointError(
                f"no space left on device under {root} (needs ~{needed / 1e9:.2f} GB for {final.name}, "
                f"{shutil.disk_usage(root).free / 1e9:.2f} GB free): the partial save was removed and the "
                f"older checkpoints are kept; free space (or lower checkpoint.keep) and resubmit: the run "
                f"resumes from the newest one") from e
        if isinstance(e, Exception):
            raise
        raise CheckpointError(f"saving {final.name} failed: {e}") from e
    dist.barrier()
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _dcp_exception() -> type:
    from torch.distributed.checkpoint.api import CheckpointException
    return CheckpointException


_DISK_FULL_TEXT = ("no space left on device", "unexpected pos", "file write failed", "disk quota exceeded",
                   "errno 28", "enospc")


def _disk_full(e: BaseException) -> bool:
    """Does `e` (or what it wraps: the exception chain, torch's per-rank failures, the other ranks'
    messages relayed by `agree`) come from a full disk? torch's zip writer says only "unexpected pos"
    or "file write failed" when a write comes up short."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(x).lower() for t in _DISK_FULL_TEXT):
            return True
        todo += [x.__cause__, x.__context__]
        todo += [f[0] for f in (getattr(x, "failures", None) or {}).values() if isinstance(f, tuple)]
    return False


def _needed_bytes(root: Path, state: dict) -> int:
    """The size of the checkpoint about to be written: the newest complete one's (exact once a run has
    saved) or else the main replicas' tensor bytes of the sharded state, summed over the ranks."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    local, todo = 0, [state]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            todo += list(x.values())
        elif isinstance(x, (list, tuple)):
            todo += list(x)
        elif torch.is_tensor(getattr(x, "data", None)) and is_main_replica(getattr(x, "replica_id", 0)):
            local += x.data.numel() * x.data.element_size()
    total = torch.tensor([local], dtype=torch.int64, device="cpu")   # gloo side of the default group
    dist.all_reduce(total)
    previous = latest_checkpoint(root)
    if previous is not None:
        try:
            return sum(m["size"] for m in json.loads((previous / MARKER).read_text())["files"].values())
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return int(total)


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
        raise DamagedCheckpointError(f"checkpoint {path}: no such directory")
    marker = path / MARKER
    if not marker.is_file():
        raise DamagedCheckpointError(f"checkpoint {path} is incomplete: no {MARKER} completion marker "
                              f"(the save did not finish); load an earlier checkpoint")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise DamagedCheckpointError(f"checkpoint {path}: unreadable {MARKER} ({e})") from None
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise DamagedCheckpointError(f"checkpoint {path} is corrupted: {rel} is missing")
        if f.stat().st_size != meta["size"]:
            raise DamagedCheckpointError(f"checkpoint {path} is corrupted: {rel} has {f.stat().st_size} bytes, "
                                  f"{meta['size']} were written (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise DamagedCheckpointError(f"checkpoint {path} is corrupted: checksum mismatch in {rel}")
    extra = sorted(set(_files(path)) - set(files))
    if extra:
        raise DamagedCheckpointError(f"checkpoint {path}: files not in its manifest: {extra[:5]}")
    if manifest.get("format") != FORMAT:
        raise DamagedCheckpointError(
            f"checkpoint {path} has format {manifest.get('format')} (this version reads {FORMAT}): format 1 "
            "stored RNG states as pickles, which are not loaded (unpickling runs code); start from its "
            "weights instead (model.checkpoint) or resume it with the release that wrote it")
    for rel in files:   # every rank's RNG file parses (each rank reads its own at load, after the weights)
        if rel.startswith("rng/"):
            _read_rng(path / rel)
    _check_torch_files(path)
    return manifest


# What torch's dist-checkpoint `.metadata` pickle may reference (what torch 2.x writes): its own metadata
# and plan records, torch.Size, dtypes and layout names. Anything else (os.system, builtins.eval, ...) is
# refused before torch unpickles the file unrestricted.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,       # None: any public record of the module
    "torch.distributed.checkpoint.planner": {"SavePlan", "LoadPlan", "WriteItem", "ReadItem", "WriteItemType",
                                             "LoadItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},               # a layout by name, from a fixed table
    "torch": {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
              "bool"},
    "collections": {"OrderedDict"},
}
_METADATA_PRIVATE = {("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")}   # an enum


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _METADATA_GLOBALS.get(module, set())
        if (allowed is None and not name.startswith("_")) or (allowed and name in allowed) or \
                (module, name) in _METADATA_PRIVATE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _slice(path: Path, info) -> bytes:
    if getattr(info, "transform_descriptors", None):
        raise DamagedCheckpointError(f"checkpoint {path}: transformed (compressed) byte items: this trainer "
                                     "writes none")
    f = (path / str(info.relative_path)).resolve()
    if f.parent != path.resolve() or not f.is_file():
        raise DamagedCheckpointError(f"checkpoint {path}: .metadata points outside the checkpoint ({info.relative_path})")
    with open(f, "rb") as fh:
        fh.seek(int(info.offset))
        return fh.read(int(info.length))


def _check_torch_files(path: Path) -> None:
    """The files torch and megatron would unpickle: `.metadata` (read by torch with plain pickle.load) with
    the allow-list above, no pickled byte items (torch loads them with weights_only=False), common.pt
    with weights_only=True. Nothing here executes code from the checkpoint."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_file = path / ".metadata"
    if meta_file.is_file():
        try:
            metadata = _MetadataUnpickler(io.BytesIO(meta_file.read_bytes())).load()
        except Exception as e:   # noqa: BLE001 - anything that does not unpickle safely is refused
            raise DamagedCheckpointError(f"checkpoint {path}: unsafe or unreadable .metadata ({e}); torch reads "
                                         "this file with pickle, so it is checked and refused") from None
        entries = getattr(metadata, "state_dict_metadata", None)
        if not isinstance(entries, dict):
            raise DamagedCheckpointError(f"checkpoint {path}: .metadata is not a dist-checkpoint metadata record")
        # byte items (megatron's `_extra_state` objects) torch.load's with weights_only=False: each must
        # load with weights_only=True first, so only allow-listed data types can be in them
        byte_keys = {k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)}
        for index, info in (getattr(metadata, "storage_data", None) or {}).items():
            if getattr(index, "fqn", None) not in byte_keys:
                continue
            blob = _slice(path, info)
            try:
                torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as e:   # noqa: BLE001
                raise DamagedCheckpointError(f"checkpoint {path}: sharded object {index.fqn} does not load with "
                                             f"weights_only=True ({type(e).__name__}); torch would unpickle it "
                                             "unrestricted, so it is refused") from None
    common = path / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as e:   # noqa: BLE001
            raise DamagedCheckpointError(f"checkpoint {path}: common.pt does not load with weights_only=True "
                                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None




def _verify_everywhere(path: Path) -> dict:
    """Rank 0 verifies; every rank gets the manifest or raises the same error (nobody hangs). All
    ranks must load the same checkpoint: a rank passing another path is refused too."""
    paths = [None] * dist.get_world_size()
    dist.all_gather_object(paths, str(path.resolve()))

    def verify() -> dict:
        if len(set(paths)) != 1:
            raise CheckpointError(f"ranks asked to load different checkpoints: {sorted(set(paths))}")
        return verify_checkpoint(path)

    def others(failures: list[Failure]) -> CheckpointError:
        kind = DamagedCheckpointError if failures[0].kind == "DamagedCheckpointError" else CheckpointError
        return kind(failures[0].message)

    return agree(verify, others, src=0)


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
    rng = agree(lambda: _read_rng(path / "rng" / f"rank{dist.get_rank()}.json"),
                lambda failures: DamagedCheckpointError(failures[0].message))   # before any state is touched
    _ensure_optimizer_state(actor.optimizer)
    state = dist_checkpointing.load(_sharded_state(actor, is_loading=True), str(path))
    unwrap(actor.chunks[0]).load_state_dict(state["model"], strict=True)
    actor.optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(actor.optimizer)
    _set_rng_state(rng)
    actor.iteration = int(manifest["iteration"])
    actor.consumed_samples = int(manifest["consumed_samples"])
    dist.barrier()
    return manifest


def load_newest(root: str | os.PathLike, actor, on_damaged: str = "error") -> tuple[Optional[Path], dict, list]:
    """Load the newest checkpoint under `root` into `actor` (every rank). A damaged one (it does not
    verify: incomplete, truncated, corrupted, unsafe) raises under on_damaged "error"; under "previous"
    the next older one is tried, and so on. Returns (path, manifest, skipped: [(path, reason)]), or
    (None, {}, skipped) when there is none to load (skipped non-empty: every one was damaged)."""
    if on_damaged not in ON_DAMAGED:
        raise ValueError(f"on_damaged must be one of {ON_DAMAGED}, got {on_damaged!r}")
    root = Path(root)
    # every iter_* directory, with or without its marker: a committed checkpoint always has one, so one
    # without was damaged after the fact (temp dirs are .iter_*.tmp and never count)
    candidates = sorted((p for p in root.glob("iter_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    box = [[str(p) for p in candidates]]
    dist.broadcast_object_list(box, src=0)   # rank 0's view decides: every rank tries the same ones
    skipped = []
    for path in map(Path, box[0]):
        try:
            return path, load_checkpoint(path, actor), skipped
        except DamagedCheckpointError as e:
            if on_damaged == "error":
                older = [p for p in box[0] if p < str(path)]
                hint = (f"set checkpoint.on_damaged=previous to resume from the newest older one that verifies "
                        f"({len(older)} older: {', '.join(Path(p).name for p in older[:3]) or 'none'})")
                raise DamagedCheckpointError(f"{e}; {hint}, or remove {path}") from None
            skipped.append((path, str(e)))
    return None, {}, skipped
