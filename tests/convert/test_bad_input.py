"""Bad input fails with a clear error before anything is written (no output, no staging directory).

These run the real entry points in this process (a world of one): the checks all happen before the
model is built, so megatron-core is never imported here. The multi-rank agreement on a refusal is in
test_roundtrip.py (every one of 4 ranks raises, nothing left behind).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_rl.convert import CheckpointError, UnsupportedModelError
from megatron_rl.megatron.hf_checkpoint import hf_to_megatron, hf_to_megatron_main, megatron_to_hf, megatron_to_hf_main


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny llama saved as 3+ safetensors shards with an index."""
    from safetensors.torch import save_file

    from megatron_rl.convert import hf_tensor_specs, to_model_config
    from megatron_rl.convert.safetensors_io import write_index
    root = tmp_path_factory.mktemp("bad")
    src = root / "llama"
    src.mkdir()
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float32"}
    (src / "config.json").write_text(json.dumps(hf))
    specs = hf_tensor_specs(to_model_config(hf, "float32"))
    files = [specs[i::3] for i in range(3)]
    for i, part in enumerate(files):
        save_file({n: torch.randn(s) for n, s in part}, str(src / f"model-{i + 1:05d}-of-00003.safetensors"))
    write_index(src, [(f"model-{i + 1:05d}-of-00003.safetensors", [(n, 4) for n, _ in part])
                      for i, part in enumerate(files)])
    return root, src


def _copy(src, root, name):
    dst = root / name
    shutil.copytree(src, dst)
    return dst


def _nothing_written(out):
    assert not out.exists(), f"{out} was created"
    assert not list(out.parent.glob(f".{out.name}.*")), "a staging directory was left behind"


def test_missing_shard_file(sharded):
    root, src = sharded
    bad = _copy(src, root, "missing")
    (bad / "model-00002-of-00003.safetensors").unlink()
    out = root / "missing.out"
    with pytest.raises(CheckpointError, match=r"missing shard file\(s\) \['model-00002-of-00003.safetensors'\]"):
        hf_to_megatron(bad, out, tp=1)
    _nothing_written(out)


def test_truncated_safetensors_file(sharded):
    root, src = sharded
    bad = _copy(src, root, "truncated")
    f = bad / "model-00003-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    out = root / "truncated.out"
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors file .*model-00003-of-00003"):
        hf_to_megatron(bad, out, tp=1)
    _nothing_written(out)


def test_missing_tensor_and_wrong_shape(sharded):
    root, src = sharded
    from safetensors.torch import load_file, save_file

    bad = _copy(src, root, "badshape")
    f = bad / "model-00001-of-00003.safetensors"
    tensors = load_file(str(f))
    name = sorted(tensors)[0]
    tensors[name] = torch.randn(3, 3)
    save_file(tensors, str(f))
    out = root / "badshape.out"
    with pytest.raises(CheckpointError, match="shapes disagree with config.json"):
        hf_to_megatron(bad, out, tp=1)
    _nothing_written(out)


def test_heads_not_divisible_by_tp(sharded):
    root, src = sharded
    out = root / "tp3.out"
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3 does not divide num_attention_heads=4"):
        hf_to_megatron(src, out, tp=3)
    _nothing_written(out)
    with pytest.raises(ValueError, match="world size 1 is not a multiple of tp \\* pp = 2"):
        hf_to_megatron(src, out, tp=2)
    _nothing_written(out)


def test_unsupported_architecture(sharded):
    root, src = sharded
    bad = _copy(src, root, "gemma")
    hf = json.loads((bad / "config.json").read_text())
    hf["architectures"] = ["GemmaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(hf))
    out = root / "gemma.out"
    with pytest.raises(UnsupportedModelError, match="supported architectures: LlamaForCausalLM, MistralForCausalLM, "
                                                    "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        hf_to_megatron(bad, out)
    _nothing_written(out)


def test_existing_target_is_refused_without_overwrite(sharded, capsys):
    root, src = sharded
    out = root / "existing.out"
    out.mkdir()
    (out / "megatron_rl_model.json").write_text("{}")
    (out / "keep.txt").write_text("untouched")
    with pytest.raises(CheckpointError, match="already holds a converted checkpoint; pass --overwrite"):
        hf_to_megatron(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "megatron_rl_model.json"]
    assert (out / "keep.txt").read_text() == "untouched"
    # the command-line entry point: exit status 1 and one clear line, no traceback
    assert hf_to_megatron_main(["--hf-dir", str(src), "--out", str(out), "--tp", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: output" in err and "pass --overwrite to replace it" in err and "Traceback" not in err
    assert megatron_to_hf_main(["--ckpt-dir", str(out), "--out", str(root / "x")]) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="would overwrite the source"):
        hf_to_megatron(src, src, overwrite=True)
    hf_out = root / "existing_hf.out"
    hf_out.mkdir()
    (hf_out / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a converted checkpoint"):
        megatron_to_hf(src, root / "export.out")       # an HF dir is not a converted checkpoint
    _nothing_written(root / "export.out")


def test_export_of_incomplete_checkpoint_is_refused(sharded, tmp_path):
    from megatron_rl.convert import to_model_config
    from megatron_rl.convert.layout import write_metadata

    _, src = sharded
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    hf = json.loads((src / "config.json").read_text())
    write_metadata(ckpt, to_model_config(hf, "float32"), hf, str(src), 1, 1)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="dist-checkpoint weights/ is missing or incomplete"):
        megatron_to_hf(ckpt, out)
    _nothing_written(out)
