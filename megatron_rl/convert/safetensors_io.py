"""Lazy, per-tensor safetensors reading and streaming writing, torch + standard library only.

Why not `safetensors.safe_open`: it memory-maps each file, and every page a rank touches stays in
its resident set while the file is open. A tensor-parallel rank slicing the columns of a row-parallel
weight touches the whole tensor, so over a 70B model the RSS would climb far above its shard. Here a
read is an explicit `readinto` of exactly the bytes needed (a row range, or row chunks of bounded
size for a column range), so peak memory stays at the shard being built plus one chunk.

Why not `safetensors.torch.save_file`: it needs the whole shard in memory. The writer below knows
every tensor's shape and dtype up front (they follow from the model config), writes the header
first and then each tensor at its offset as it arrives: memory is one tensor at a time.

Format (safetensors spec): 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data buffer,
offsets relative to its start, tensors packed with no holes.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_STR = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_CHUNK_BYTES = 64 << 20        # column slices are read in row chunks of at most this size
_MAX_HEADER = 100 << 20        # the safetensors reference implementation's limit


class CheckpointError(ValueError):
    """A source or target checkpoint that cannot be used as is (the message says what and where)."""


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size on open, data read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"missing safetensors file: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"truncated safetensors file {self.path}: {size} bytes, no header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"truncated or corrupt safetensors file {self.path}: header says "
                                      f"{n} bytes of JSON, file has {size} bytes")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"corrupt safetensors header in {self.path}: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors: dict[str, dict] = header
        end = 0
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, stop = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * DTYPES[info["dtype"]].itemsize
            if stop - begin != nbytes:
                raise CheckpointError(f"corrupt safetensors file {self.path}: tensor {name!r} spans "
                                      f"{stop - begin} bytes, its shape needs {nbytes}")
            end = max(end, stop)
        # A truncated download keeps its header: only the size tells. Catch it before any reading.
        if self.data_start + end != size:
            raise CheckpointError(f"truncated or corrupt safetensors file {self.path}: header describes "
                                  f"{self.data_start + end} bytes, file has {size}")
        self._fh = None

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.tensors[name]["dtype"]]

    def _read_bytes(self, offset: int, nbytes: int, out: torch.Tensor) -> None:
        if self._fh is None:
            self._fh = open(self.path, "rb", buffering=0)
        self._fh.seek(self.data_start + offset)
        view = memoryview(_buffer(out)).cast("B")
        got = self._fh.readinto(view)
        if got != nbytes:
            raise CheckpointError(f"short read in {self.path}: wanted {nbytes} bytes, got {got}")

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None):
        """The tensor `name`, or only its [start, stop) range along `dim` (0 or 1), as a new tensor."""
        info = self.tensors[name]
        shape, dtype = list(info["shape"]), DTYPES[info["dtype"]]
        base = info["data_offsets"][0]
        if dim is None:
            dim, start, stop = 0, 0, (shape[0] if shape else None)
            if not shape:  # scalar
                out = torch.empty((), dtype=dtype)
                self._read_bytes(base, dtype.itemsize, out)
                return out
        stop = shape[dim] if stop is None else stop
        if not 0 <= start <= stop <= shape[dim]:
            raise IndexError(f"{name}: range [{start}, {stop}) outside dim {dim} of size {shape[dim]}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if dim == 0:
            out = torch.empty([stop - start] + shape[1:], dtype=dtype)
            self._read_bytes(base + start * row_bytes, (stop - start) * row_bytes, out)
            return out
        if dim != 1 or len(shape) != 2:
            raise ValueError(f"{name}: slicing supports dim 0, or dim 1 of a matrix; got dim {dim} of {shape}")
        out = torch.empty(shape[0], stop - start, dtype=dtype)
        rows = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        chunk = torch.empty(min(rows, shape[0]), shape[1], dtype=dtype)
        for r in range(0, shape[0], rows):
            n = min(rows, shape[0] - r)
            part = chunk[:n]
            self._read_bytes(base + r * row_bytes, n * row_bytes, part)
            out[r:r + n] = part[:, start:stop]
        return out

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _buffer(t: torch.Tensor):
    """A writable buffer over a contiguous CPU tensor's bytes, without numpy (ctypes view, no copy)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    n = t.numel() * t.element_size()
    return (ctypes.c_char * n).from_address(t.data_ptr()) if n else bytearray()


class HFCheckpoint:
    """A Hugging Face checkpoint directory: config.json plus model.safetensors or an index + shards.

    Opening validates everything a conversion will touch, before anything is written: config.json
    parses, every shard the index names exists, and every file's header agrees with its size.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"not a checkpoint directory: {self.path}")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path} has no config.json")
        try:
            self.config = json.loads(cfg.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
            raise CheckpointError(f"{self.path} holds no {SINGLE_FILE} or {INDEX_FILE}"
                                  + (f" (found {found}: convert it to safetensors first)" if found else ""))
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.path}: missing shard file(s) {missing} named by {INDEX_FILE}")
        self.files = {f: SafetensorsFile(self.path / f) for f in files}
        self.where: dict[str, SafetensorsFile] = {}
        for fname, sf in self.files.items():
            for name in sf.tensors:
                self.where[name] = sf
        if weight_map:
            for name, fname in weight_map.items():
                if name not in self.files[fname].tensors:
                    raise CheckpointError(f"{self.path / fname}: lacks tensor {name!r} that {INDEX_FILE} "
                                          f"places there")

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> list[int]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).dtype(name)

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None):
        return self._file(name).read(name, dim, start, stop)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self.where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def close(self):
        for sf in self.files.values():
            sf.close()


class SafetensorsWriter:
    """Writes one .safetensors file whose tensors (name, dtype, shape) are all known in advance.

    The header goes first; `write(name, tensor)` puts each tensor at its offset, in any order, so a
    caller streams one tensor at a time. `close()` refuses to finish a file with a tensor missing.
    """

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.offsets: dict[str, tuple[int, torch.dtype, list[int]]] = {}
        pos = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.offsets[name] = (pos, dtype, list(shape))
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the spec allows space padding; keeps the data 8-byte aligned
        self.data_start = 8 + len(raw)
        self.total = self.data_start + pos
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._fh.truncate(self.total)
        self.pending = set(self.offsets)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        pos, dtype, shape = self.offsets[name]
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: {name} planned as {dtype} {shape}, got {tensor.dtype} "
                             f"{list(tensor.shape)}")
        tensor = tensor.detach().cpu().contiguous()
        self._fh.seek(self.data_start + pos)
        self._fh.write(_buffer(tensor))
        self.pending.discard(name)

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        if self.pending:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}...")

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_index(out_dir: str | Path, files: Iterable[tuple[str, Iterable[tuple[str, int]]]]) -> None:
    """model.safetensors.index.json: files is [(file name, [(tensor name, nbytes)])]."""
    weight_map, total = {}, 0
    for fname, tensors in files:
        for name, nbytes in tensors:
            weight_map[name] = fname
            total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    Path(out_dir, INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

