"""The two tools as users run them: conversion under torchrun (env:// rendezvous, 2 ranks, TP2) replacing
an existing target (--overwrite), export in one plain process. (The refusal without --overwrite, and the
CLI's one-line error, are checked in-process in test_bad_input.py: no process launch needed.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(args, timeout=240):
    """Run in its own session so a timeout kills torchrun's workers too, not just the launcher."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {args}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_torchrun_convert_then_export(tmp_path):
    from safetensors import safe_open

    from megatron_rl.utils.tiny import make_tiny_hf_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path / "tok")
    src = tmp_path / "qwen3"
    make_tiny_hf_model("qwen3", src, vocab_size=len(tok), tokenizer=tok, tie_word_embeddings=True)
    out = tmp_path / "mcore"
    out.mkdir()
    (out / "megatron_rl_model.json").write_text("{}")  # an older conversion sits in the target
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "tools/convert_hf_to_megatron.py", "--hf-dir", str(src), "--out", str(out), "--tp", "2"]

    done = _run(torchrun + ["--overwrite"])
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "megatron_rl_model.json").read_text())
    assert meta["converted_at_layout"] == {"tp": 2, "pp": 1} and meta["architecture"] == "Qwen3ForCausalLM"
    assert (out / "weights" / "metadata.json").is_file() and (out / "tokenizer.json").is_file()

    hf = tmp_path / "hf"
    exported = _run(["tools/convert_megatron_to_hf.py", "--ckpt-dir", str(out), "--out", str(hf),
                     "--max-shard-size", "200KB"])
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert len(list(hf.glob("model-*.safetensors"))) > 1 and (hf / "model.safetensors.index.json").is_file()
    weight_map = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(src / "model.safetensors"), "pt") as ref:
        assert sorted(ref.keys()) == sorted(weight_map)
        for name, fname in weight_map.items():
            with safe_open(str(hf / fname), "pt") as fh:
                assert torch.equal(fh.get_tensor(name), ref.get_tensor(name)), name
    assert json.loads((hf / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
