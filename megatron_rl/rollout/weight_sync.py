"""Stream the learner's weights into the vLLM engine in bounded buckets, and check they arrived.

Input: an iterator of (hf_name, tensor) pairs in HF checkpoint naming (the convert module maps
Megatron's parameters to these one tensor at a time). Output: the engine serves those weights.

Two traps shape this file (platform.md, vLLM section):
- vLLM reloads layer by layer and rebuilds a fused module (q/k/v -> qkv_proj, gate/up -> gate_up_proj)
  from uninitialised memory when only part of it arrives in one update call: silent garbage, no error.
  So a bucket always holds whole fused groups, and a group split across the stream is an error.
- In multiprocess mode raw tensors cannot be `collective_rpc` arguments; a bucket travels as safetensors
  bytes (worker_ext.WeightSyncExtension unpacks it).
After a sync the prefix cache is reset: KV blocks computed with the old weights must not be reused.
With engine tensor parallelism each worker reads back only its slice (worker_ext); the driver side here
merges the workers' answers: a name matches only when every worker's slice does.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Optional, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger(__name__)

# HF sub-modules that vLLM fuses into one parameter (Llama / Qwen2 / Qwen3 / Mistral families)
FUSED_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
DEFAULT_BUCKET_BYTES = 256 << 20
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


class RpcEngine(Protocol):
    def collective_rpc(self, method: str, args: tuple = ()) -> list: ...
    def reset_prefix_cache(self) -> None: ...


def fused_group_key(hf_name: str) -> str:
    """The vLLM module an HF tensor loads into: tensors with the same key must travel together."""
    module_path = hf_name.rpartition(".")[0]
    parent, _, mod = module_path.rpartition(".")
    fused = FUSED_MODULES.get(mod)
    if fused is None:
        return module_path
    return f"{parent}.{fused}" if parent else fused


def _layer_key(group_key: str) -> str:
    m = _LAYER.match(group_key + ".")
    return m.group(1) if m else group_key


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 max_bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of HF-named tensors into buckets of at most `max_bucket_bytes`, never splitting
    a fused group (q/k/v of a layer, gate/up of a layer, or the tensors of any one module).

    Streaming: a layer's groups are held until the stream moves to another layer (or ends), so the
    producer must yield each layer's tensors together, in any order inside the layer. A tensor that
    arrives after its group was flushed raises instead of corrupting the engine. A bucket exceeds the
    cap only when a single group alone does.
    """
    if max_bucket_bytes < 1:
        raise ValueError(f"max_bucket_bytes must be >= 1, got {max_bucket_bytes}")
    open_groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    flushed: set[str] = set()
    seen: set[str] = set()
    current_layer: Optional[str] = None
    bucket: list[tuple[str, torch.Tensor]] = []
    bucket_bytes = 0

    def flush_open():
        nonlocal bucket, bucket_bytes
        for key, items in open_groups.items():
            size = sum(_nbytes(t) for _, t in items)
            if bucket and bucket_bytes + size > max_bucket_bytes:
                yield bucket
                bucket, bucket_bytes = [], 0
            if size > max_bucket_bytes:
                log.debug("fused group %s (%d bytes) exceeds the bucket cap %d: sent alone", key, size,
                          max_bucket_bytes)
            bucket.extend(items)
            bucket_bytes += size
            flushed.add(key)
        open_groups.clear()

    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight sync: tensor {name!r} appears twice in the stream")
        seen.add(name)
        key = fused_group_key(name)
        if key in flushed:
            raise ValueError(f"weight sync: {name!r} arrives after its fused group {key!r} was already "
                             "bucketed (the stream left that layer); yield each layer's tensors together, "
                             "since a fused module updated in two parts is silently corrupted by vLLM")
        layer = _layer_key(key)
        if current_layer is not None and layer != current_layer:
            yield from flush_open()
        current_layer = layer
        open_groups.setdefault(key, []).append((name, tensor))
    yield from flush_open()
    if bucket:
        yield bucket


def serialize_bucket(bucket: list[tuple[str, torch.Tensor]]) -> bytes:
    """Safetensors bytes of a bucket (CPU, contiguous; tensors sharing storage are copied apart)."""
    out, ptrs = {}, set()
    for name, t in bucket:
        t = t.detach().to("cpu").contiguous()
        if t.numel() and t.data_ptr() in ptrs:   # safetensors refuses shared storage (tied weights)
            t = t.clone()
        ptrs.add(t.data_ptr())
        out[name] = t
    return st_save(out)


@dataclass
class SyncStats:
    num_buckets: int = 0
    num_tensors: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    max_bucket_bytes_seen: int = 0

    def as_metrics(self, prefix: str = "weight_sync/") -> dict[str, float]:
        return {f"{prefix}buckets": self.num_buckets, f"{prefix}tensors": self.num_tensors,
                f"{prefix}bytes": self.num_bytes, f"{prefix}seconds": self.seconds}


def sync_weights(engine: RpcEngine, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 max_bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncStats:
    """Load the stream into the engine bucket by bucket, then reset its prefix cache.

    Tensors not in the stream keep their current values. Under torch.distributed only the rank that
    owns the engine calls this; gathering the HF tensors onto it is the learner side's job.
    """
    stats = SyncStats()
    t0 = time.perf_counter()
    for bucket in plan_buckets(named_tensors, max_bucket_bytes):
        payload = serialize_bucket(bucket)
        loaded = engine.collective_rpc("mrl_load_weights", args=(payload,))
        if any(n != len(bucket) for n in loaded):
            raise RuntimeError(f"weight sync: a worker loaded {loaded} tensors of a bucket of {len(bucket)}")
        stats.num_buckets += 1
        stats.num_tensors += len(bucket)
        nbytes = sum(_nbytes(t) for _, t in bucket)
        stats.num_bytes += nbytes
        stats.max_bucket_bytes_seen = max(stats.max_bucket_bytes_seen, nbytes)
    engine.reset_prefix_cache()
    stats.seconds = time.perf_counter() - t0
    return stats


@dataclass
class WeightCheck:
    """The engine's weights against the learner's: ok when every name matched within `atol`."""
    max_abs_diff: float = 0.0
    num_checked: int = 0
    mismatched: dict[str, float] = field(default_factory=dict)    # name -> max abs diff (> atol)
    missing: list[str] = field(default_factory=list)               # learner names the engine lacks
    shape_mismatch: dict[str, tuple] = field(default_factory=dict)  # name -> (engine shape, learner shape)
    not_checked: list[str] = field(default_factory=list)           # engine names the learner never sent

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.shape_mismatch)

    def summary(self, limit: int = 8) -> str:
        parts = [f"checked {self.num_checked} tensors, max |engine - learner| = {self.max_abs_diff:.3g}"]
        if self.mismatched:
            worst = sorted(self.mismatched.items(), key=lambda kv: -kv[1])[:limit]
            parts.append(f"{len(self.mismatched)} mismatched: " + ", ".join(f"{n} ({d:.3g})" for n, d in worst))
        if self.missing:
            parts.append(f"{len(self.missing)} missing in the engine: {self.missing[:limit]}")
        if self.shape_mismatch:
            parts.append(f"{len(self.shape_mismatch)} shape mismatches: {list(self.shape_mismatch.items())[:limit]}")
        if self.not_checked:
            parts.append(f"{len(self.not_checked)} engine tensors not sent: {self.not_checked[:limit]}")
        return "; ".join(parts)


class ShardLayout(NamedTuple):
    """Where one engine worker's tensor `t` sits in the full HF tensor: full.narrow(dim, start, t.shape[dim])."""
    dim: int
    start: int
    full: int     # the full tensor's size along `dim`

    def full_shape(self, shape) -> tuple:
        return tuple(self.full if d == self.dim else int(n) for d, n in enumerate(shape))

    def slice(self, full: torch.Tensor, shape) -> torch.Tensor:
        return full.narrow(self.dim, self.start, int(shape[self.dim]))


def merge_worker_checks(results: list[dict]) -> dict:
    """One mrl_compare_weights answer from every worker's (each compared its own slice): a name's diff is
    the largest over the workers (NaN wins), and a name missing or of the wrong shape on any worker is so."""
    diffs: dict[str, float] = {}
    missing: dict[str, None] = {}      # ordered set
    shapes: dict[str, list] = {}
    for res in results:
        for name, d in res["diffs"].items():
            prev = diffs.get(name)
            diffs[name] = d if prev is None or d != d or d > prev else prev
        missing.update(dict.fromkeys(res["missing"]))
        for name, s in res["shapes"].items():
            shapes.setdefault(name, s)
    return {"diffs": {n: d for n, d in diffs.items() if n not in missing and n not in shapes},
            "missing": list(missing), "shapes": shapes}


def verify_weights(engine: RpcEngine, named_tensors: Iterable[tuple[str, torch.Tensor]],
                   max_bucket_bytes: int = DEFAULT_BUCKET_BYTES, atol: float = 0.0) -> WeightCheck:
    """Compare the engine's weights with the learner's, name by name, inside the engine's workers.

    The expected tensors travel in buckets like a sync (bounded memory); only per-name max abs diffs
    come back. Each expected tensor is cast to the engine's dtype first, so a correct sync gives 0.
    """
    check = WeightCheck()
    sent = set()
    for bucket in plan_buckets(named_tensors, max_bucket_bytes):
        sent.update(n for n, _ in bucket)
        res = merge_worker_checks(engine.collective_rpc("mrl_compare_weights", args=(serialize_bucket(bucket),)))
        for name, d in res["diffs"].items():
            check.num_checked += 1
            check.max_abs_diff = max(check.max_abs_diff, d)
            if not d <= atol:   # also catches NaN
                check.mismatched[name] = d
        check.missing += res["missing"]
        check.shape_mismatch.update({k: tuple(tuple(s) for s in v) for k, v in res["shapes"].items()})
    engine_names = engine.collective_rpc("mrl_param_names")[0]   # the same HF names on every worker
    check.not_checked = sorted(set(engine_names) - sent)
    return check


def read_engine_weights(engine: RpcEngine, names: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """The engine's weights in HF naming (all when `names` is None), the workers' slices put together;
    for tests and debugging of small models, since every tensor comes back whole."""
    out: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for res in engine.collective_rpc("mrl_read_weights", args=(names,)):
        for name, t in st_load(res["tensors"]).items():
            lay = res["layouts"][name]
            if lay is None:
                out.setdefault(name, t)
                continue
            lay = ShardLayout(*lay)
            if name not in out:
                out[name] = t.new_zeros(lay.full_shape(t.shape))
                covered[name] = torch.zeros(lay.full, dtype=torch.bool)
            lay.slice(out[name], t.shape).copy_(t)
            covered[name][lay.start: lay.start + t.shape[lay.dim]] = True
    gaps = [n for n, c in covered.items() if not bool(c.all())]
    if gaps:
        raise RuntimeError(f"read_engine_weights: the workers' slices leave parts of {gaps[:8]} uncovered")
    return out
