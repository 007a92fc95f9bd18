"""On-disk layout of a converted checkpoint, atomic output directories, and the export file plan.

A converted checkpoint directory:

    <dir>/megatron_rl_model.json   metadata: source architecture, ModelConfig, the source config.json,
                                   conversion version (the trainer builds the model from it)
    <dir>/weights/                 megatron-core dist-checkpoint (torch_dist), loadable at any TP x PP
    <dir>/tokenizer.json ...       tokenizer files and generation_config.json, copied verbatim

Outputs are built in a hidden staging directory next to the target and renamed into place only once
complete, so a failed or killed conversion never leaves anything that looks like a checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_rl.model_config import ModelConfig

from .families import FAMILIES, model_entries
from .mapping import hf_shape, stage_of
from .safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError

META_FILE = "megatron_rl_model.json"
WEIGHTS_DIR = "weights"
META_FORMAT = "megatron_rl.converted_checkpoint"
CONVERSION_VERSION = 1
# Copied verbatim in both directions (whatever of these the source has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_dir(ckpt_dir: str | Path) -> Path:
    return Path(ckpt_dir) / WEIGHTS_DIR


def write_metadata(out_dir: Path, cfg: ModelConfig, hf_config: dict, source: str, tp: int, pp: int) -> None:
    meta = {"format": META_FORMAT, "conversion_version": CONVERSION_VERSION,
            "architecture": (hf_config.get("architectures") or [FAMILIES[cfg.family].ARCHITECTURES[0]])[0],
            "family": cfg.family, "dtype": cfg.dtype, "model_config": cfg.to_dict(), "hf_config": hf_config,
            "source": source, "weights": WEIGHTS_DIR, "weights_format": "torch_dist",
            "converted_at_layout": {"tp": tp, "pp": pp}}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_metadata(ckpt_dir: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, metadata dict) of a converted checkpoint; what the trainer reads to build the model."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a converted checkpoint: no {META_FILE}")
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
    if int(meta.get("conversion_version", 0)) > CONVERSION_VERSION:
        raise CheckpointError(f"{path}: written by conversion version {meta['conversion_version']}, "
                              f"this megatron_rl reads up to {CONVERSION_VERSION}; upgrade megatron_rl")
    if not (Path(ckpt_dir) / meta.get("weights", WEIGHTS_DIR) / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir}: the dist-checkpoint {meta.get('weights', WEIGHTS_DIR)}/ is missing "
                              f"or incomplete (no metadata.json)")
    return ModelConfig.from_dict(meta["model_config"]), meta


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_generation_config(out_dir: Path, hf_config: dict) -> None:
    """A minimal generation_config.json (token ids from config.json) when the source had none, as
    transformers derives one from the model config."""
    gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
    (out_dir / "generation_config.json").write_text(json.dumps({**gen, "_from_model_config": True}, indent=2) + "\n")


def check_target(dst: str | Path, overwrite: bool, src: Optional[str | Path] = None) -> None:
    """Refuse a target that already holds something (unless overwrite), is a file, or would swallow
    the source."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"output {dst} exists and is not a directory")
    if src is not None:
        s, d = Path(src).resolve(), dst.resolve()
        if s == d or d in s.parents:
            raise CheckpointError(f"output {dst} would overwrite the source {src}")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        what = "a converted checkpoint" if (dst / META_FILE).exists() else (
            "an HF checkpoint" if (dst / "config.json").exists() else "files")
        raise CheckpointError(f"output {dst} already holds {what}; pass --overwrite to replace it")


def staging_dir(dst: str | Path) -> Path:
    dst = Path(dst)
    return dst.parent / f".{dst.name}.partial"


def start_staging(dst: str | Path) -> Path:
    """A fresh, empty staging directory for `dst` (a leftover from a killed run is removed)."""
    tmp = staging_dir(dst)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, dst: str | Path) -> None:
    """Move the finished staging directory into place; an old target (overwrite) is replaced."""
    dst = Path(dst)
    old = dst.parent / f".{dst.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def abandon(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ExportFile:
    name: str
    stage: int                                   # the pipeline stage that writes it
    tensors: tuple[tuple[str, tuple[int, ...]], ...]   # (HF name, shape) in write order

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(math.prod(s) * dtype.itemsize for _, s in self.tensors)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ValueError(f"cannot read size {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(num) * units[unit])


def export_plan(cfg: ModelConfig, pp: int, max_shard_bytes: int) -> list[ExportFile]:
    """The HF safetensors files of an export: each holds tensors of one pipeline stage only (that
    stage writes it, streaming), consecutive in HF order, at most max_shard_bytes unless one tensor
    is larger. Every rank computes the same plan from the config alone."""
    itemsize = _DTYPES[cfg.dtype].itemsize
    groups: list[tuple[int, list]] = []
    for stage in range(pp):
        current, size = [], 0
        for e in model_entries(cfg):
            if not e.export or stage_of(cfg, e, pp) != stage:
                continue
            for name in e.hf:
                shape = tuple(hf_shape(cfg, name))
                nbytes = math.prod(shape) * itemsize
                if current and size + nbytes > max_shard_bytes:
                    groups.append((stage, current))
                    current, size = [], 0
                current.append((name, shape))
                size += nbytes
        if current:
            groups.append((stage, current))
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [ExportFile(name, stage, tuple(t)) for name, (stage, t) in zip(names, groups)]



__all__ = ["META_FILE", "WEIGHTS_DIR", "INDEX_FILE", "TOKENIZER_FILES", "ExportFile", "abandon", "check_target",
           "commit", "copy_side_files", "export_plan", "parse_size", "read_metadata", "staging_dir",
           "start_staging", "weights_dir", "write_generation_config", "write_metadata"]
