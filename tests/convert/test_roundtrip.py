"""HF -> Megatron -> HF on tiny random models of every family, through real megatron-core on 4 gloo ranks.

One 4-rank launch (process start + megatron import cost ~5 s a rank) does, per model: convert at one
layout, load the dist-checkpoint at TP x PP in {1, 2} x {1, 2} and compare logits with transformers'
(fp32, max abs error <= 1e-5), export at another layout. The parent then checks the export: every
tensor bit-identical to the source, config.json equal, transformers loads it and gives the same logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.megatron.common import pipeline_logits
from tests.multirank import run_ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TOL = 1e-5
# name: (family, make_tiny_hf_model kwargs, convert layout (tp, pp), export layout (tp, pp))
MODELS = {
    # GQA, untied; llama3 RoPE scaling with a short original context so it changes every rotary band
    "llama": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
              (2, 2), (1, 1)),
    # QKV bias, tied embeddings, config.json in the transformers 4.x spelling (rope_theta, torch_dtype)
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6), (2, 1), (2, 2)),
    # QK-norm, GQA, untied
    "qwen3": ("qwen3", dict(), (1, 2), (2, 1)),
    # MHA (no GQA), linear RoPE scaling
    "mistral": ("mistral", dict(num_kv_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}), (1, 1), (1, 2)),
    # bf16 preserved end to end, tied, several safetensors files on export
    "llama_bf16": ("llama", dict(dtype="bfloat16", tie_word_embeddings=True), (2, 2), (2, 2)),
}
EXPORT_SHARD = {"llama_bf16": "40KB"}


def _to_tf4_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json the way hub checkpoints written by transformers 4.x are."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope.pop("rope_type")
    cfg["rope_scaling"] = rope or None
    cfg["torch_dtype"] = cfg.pop("dtype")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny HF models of each case on disk, token ids, and transformers' fp32 logits for them."""
    from transformers import AutoModelForCausalLM

    from megatron_rl.utils.tiny import make_tiny_hf_model, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("convert")
    tok = make_tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    tokens = torch.randint(0, len(tok), (2, 12))
    out = {}
    for i, (name, (family, kw, _, _)) in enumerate(MODELS.items()):
        path = root / name
        make_tiny_hf_model(family, path, vocab_size=len(tok), seed=i, tokenizer=tok, **kw)
        if name == "qwen2":
            _to_tf4_config(path)
        ref = None
        if "dtype" not in kw:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            with torch.no_grad():
                ref = model(tokens).logits
        out[name] = (path, ref)
    return root, tokens, out


def _body(rank, world, root, tokens, cases):
    from megatron_rl.convert import read_metadata
    from megatron_rl.megatron.hf_checkpoint import (build, hf_to_megatron, hf_to_megatron_main, load_weights,
                                                    megatron_to_hf, megatron_to_hf_main)
    from megatron_rl.megatron.parallel import destroy_parallel, initialize_parallel

    root = Path(root)
    report = {}
    for name, (src, ref, conv, exp, shard) in cases.items():
        ckpt = root / f"{name}.mcore"
        if name == "qwen3":  # the command-line entry points, as `megatron-rl convert` runs them
            hf_to_megatron_main(["--hf-dir", src, "--out", str(ckpt), "--tp", str(conv[0]), "--pp", str(conv[1])])
        else:
            hf_to_megatron(src, ckpt, tp=conv[0], pp=conv[1])
        cfg, meta = read_metadata(ckpt)
        errors = {}
        for tp, pp in LAYOUTS:
            ps = initialize_parallel(tp=tp, pp=pp, model_cfg=cfg)
            model = build(cfg, ps)
            load_weights(model, ckpt)
            dtypes = {p.dtype for p in model.parameters()}
            assert dtypes == {getattr(torch, cfg.dtype)}, (name, dtypes)
            if ref is not None:
                logits = pipeline_logits(model, ps, tokens, cfg.padded_vocab_size(tp))[..., :cfg.vocab_size]
                errors[(tp, pp)] = (logits - ref).abs().max().item()
            elif (tp, pp) == (2, 2):
                # a trainer keeping fp32 weights loads the bf16 checkpoint exactly (upcast on load)
                m32 = build(dataclasses.replace(cfg, dtype="float32"), ps)
                load_weights(m32, ckpt)
                for (n, a), (_, b) in zip(model.named_parameters(), m32.named_parameters()):
                    assert b.dtype == torch.float32 and torch.equal(a.float(), b), n
            destroy_parallel()
        if name == "mistral":
            megatron_to_hf_main(["--ckpt-dir", str(ckpt), "--out", str(root / f"{name}.hf"), "--tp", str(exp[0]),
                                 "--pp", str(exp[1]), "--max-shard-size", shard])
        else:
            megatron_to_hf(ckpt, root / f"{name}.hf", tp=exp[0], pp=exp[1], max_shard_size=shard)
        report[name] = {"errors": errors, "meta": meta}
    # A refused conversion: every rank raises the same clear error, and nothing is written.
    path, _, _, _, _ = cases["qwen3"]
    try:
        hf_to_megatron(path, root / "refused.mcore", tp=4, pp=1)
        report["refused"] = None
    except ValueError as e:
        report["refused"] = str(e)
    dist.barrier()
    report["refused_left"] = sorted(p.name for p in root.iterdir() if "refused" in p.name)
    return report


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    root, tokens, paths = models
    out = tmp_path_factory.mktemp("converted")
    cases = {name: (str(paths[name][0]), paths[name][1], MODELS[name][2], MODELS[name][3],
                    EXPORT_SHARD.get(name, "5GB")) for name in MODELS}
    reports = run_ranks(_body, 4, args=(str(out), tokens, cases), timeout=400)
    return out, reports


def test_logits_match_hf_at_every_layout(converted):
    _, reports = converted
    for name in MODELS:
        errors = reports[0][name]["errors"]
        if "dtype" in MODELS[name][1]:
            continue  # bf16: checked bit-exactly through the round trip below
        assert set(errors) == set(LAYOUTS), (name, errors)
        for rank_report in reports:
            for layout, err in rank_report[name]["errors"].items():
                assert err <= TOL, f"{name} at TP{layout[0]} PP{layout[1]}: max |logit diff| {err:.2e}"


def test_rope_scaling_changes_the_reference(models):
    """The llama / mistral cases only test RoPE scaling if the scaling actually changes the logits."""
    from transformers import AutoModelForCausalLM

    _, tokens, paths = models
    for name in ("llama", "mistral"):
        path, ref = paths[name]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        theta = model.config.rope_parameters["rope_theta"]
        model.config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        plain = type(model)(model.config)
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            diff = (plain(tokens).logits - ref).abs().max().item()
        assert diff > 1e-3, f"{name}: RoPE scaling changed the logits by only {diff:.1e}"


def test_metadata_describes_the_source(converted, models):
    from torch.distributed.checkpoint import FileSystemReader

    out, reports = converted
    _, _, paths = models
    for name, (family, kw, conv, _) in MODELS.items():
        meta = reports[0][name]["meta"]
        src_cfg = json.loads((paths[name][0] / "config.json").read_text())
        assert meta["hf_config"] == src_cfg
        assert meta["family"] == family and meta["architecture"] == src_cfg["architectures"][0]
        assert meta["conversion_version"] == 1 and meta["converted_at_layout"] == {"tp": conv[0], "pp": conv[1]}
        assert meta["dtype"] == kw.get("dtype", "float32")
        stored = FileSystemReader(str(out / f"{name}.mcore" / "weights")).read_metadata().state_dict_metadata
        dtypes = {m.properties.dtype for m in stored.values() if hasattr(m, "properties")}
        assert dtypes == {getattr(torch, meta["dtype"])}, (name, dtypes)  # no silent dtype change
        assert "decoder.layers.self_attention.linear_qkv.weight" in stored
        mc = meta["model_config"]
        assert mc["tie_word_embeddings"] == kw.get("tie_word_embeddings", False)
        assert mc["add_qkv_bias"] == (family == "qwen2") and mc["qk_layernorm"] == (family == "qwen3")
    assert reports[0]["qwen2"]["meta"]["model_config"]["rope_theta"] == 1e6  # read from the 4.x spelling
    assert reports[0]["llama"]["meta"]["model_config"]["rope_scaling"]["rope_type"] == "llama3"


def test_export_is_bit_identical_and_loads_in_transformers(converted, models):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = converted
    _, tokens, paths = models
    for name in MODELS:
        src, ref = paths[name]
        dst = out / f"{name}.hf"

        def tensors(d):
            files = sorted(d.glob("*.safetensors"))
            res = {}
            for f in files:
                with safe_open(f, "pt") as fh:
                    res.update({k: fh.get_tensor(k) for k in fh.keys()})
            return res, files

        a, _ = tensors(src)
        b, files = tensors(dst)
        assert sorted(a) == sorted(b), name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}: {k} differs"
        assert json.loads((dst / "config.json").read_text()) == json.loads((src / "config.json").read_text())
        for side in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (dst / side).read_bytes() == (src / side).read_bytes(), (name, side)
        if name == "llama_bf16":
            assert len(files) > 1 and (dst / "model.safetensors.index.json").is_file()
            index = json.loads((dst / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"]) == set(a)
        model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
        AutoTokenizer.from_pretrained(dst)
        if ref is not None:
            with torch.no_grad():
                assert torch.equal(model(tokens).logits, ref), name
        assert not list(out.glob(".*")), f"staging directories left behind: {list(out.glob('.*'))}"


def test_bad_layout_refused_on_every_rank(converted):
    _, reports = converted
    for rank_report in reports:
        msg = rank_report["refused"]
        assert msg is not None and "tensor_model_parallel_size=4" in msg and "num_query_groups" in msg, msg
        assert rank_report["refused_left"] == [], rank_report["refused_left"]
