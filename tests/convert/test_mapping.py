"""The convert package without megatron-core: config mapping, weight layouts, lazy IO, export plan."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_rl.convert import (DictSource, HFCheckpoint, SafetensorsWriter, UnsupportedModelError, export_plan,
                                 hf_tensor_specs, model_entries, supported_architectures, to_hf, to_hf_config,
                                 to_megatron, to_model_config)
from megatron_rl.convert import safetensors_io
from megatron_rl.convert.layout import parse_size
from megatron_rl.convert.mapping import stage_of

# Hub configs as transformers 4.x wrote them (sizes from the published config.json files).
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "attention_bias": False,
               "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "hidden_act": "silu",
              "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
QWEN3_06B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
             "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False,
             "hidden_act": "silu", "sliding_window": None, "use_sliding_window": False,
             "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
MISTRAL_7B_V03 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                  "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 32768, "max_position_embeddings": 32768,
                  "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None, "hidden_act": "silu",
                  "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_hub_configs_map_onto_model_config():
    llama = to_model_config(LLAMA_31_8B, "bfloat16")
    assert (llama.family, llama.num_query_groups, llama.head_dim, llama.rope_theta) == ("llama", 8, 128, 500000.0)
    assert llama.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert llama.padded_vocab_size(1) == 128256 and llama.padded_vocab_size(8) == 129024
    qwen2 = to_model_config(QWEN25_05B, "bfloat16")
    assert qwen2.add_qkv_bias and qwen2.tie_word_embeddings and qwen2.head_dim == 64 and qwen2.norm_epsilon == 1e-6
    qwen3 = to_model_config(QWEN3_06B, "bfloat16")
    assert qwen3.qk_layernorm and qwen3.head_dim == 128 and not qwen3.add_qkv_bias  # head_dim != 1024 / 16
    llama2 = {**LLAMA_31_8B, "hidden_size": 4096, "intermediate_size": 11008, "num_key_value_heads": 32,
              "vocab_size": 32000, "max_position_embeddings": 4096, "rope_scaling": None, "pretraining_tp": 1}
    del llama2["rope_theta"]                                # Llama 2 configs predate the field
    llama2 = to_model_config(llama2, "float16")
    assert llama2.rope_theta == 10000.0 and llama2.rope_scaling is None and llama2.num_query_groups == 32
    mistral = to_model_config(MISTRAL_7B_V03, "bfloat16")
    assert mistral.family == "mistral" and mistral.rope_scaling is None
    with pytest.raises(ValueError, match="does not divide num_attention_heads=14"):
        qwen2.check_parallel(tp=4)


@pytest.mark.parametrize("hf", [LLAMA_31_8B, QWEN25_05B, QWEN3_06B, MISTRAL_7B_V03], ids=lambda c: c["model_type"])
def test_config_round_trips(hf):
    cfg = to_model_config(hf, "bfloat16")
    assert to_hf_config(cfg, hf) == hf                      # the stored source comes back unchanged
    synthesized = to_hf_config(cfg)                         # ... and without it, the same model
    assert to_model_config(json.loads(json.dumps(synthesized)), "bfloat16") == cfg
    from transformers import AutoConfig

    loaded = AutoConfig.for_model(**{k: v for k, v in synthesized.items() if k != "architectures"})
    assert loaded.num_key_value_heads == cfg.num_query_groups and loaded.vocab_size == cfg.vocab_size
    assert loaded.rope_parameters["rope_theta"] == cfg.rope_theta


def test_transformers5_rope_parameters_are_read():
    hf = dict(LLAMA_31_8B)
    scaling = hf.pop("rope_scaling")
    hf["rope_parameters"] = {**scaling, "rope_theta": hf.pop("rope_theta")}
    assert to_model_config(hf, "bfloat16") == to_model_config(LLAMA_31_8B, "bfloat16")


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}, "supported architectures: LlamaForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "RoPE type 'yarn' is not supported; supported: default, linear, llama3"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_llama_configs_are_refused(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        to_model_config({**LLAMA_31_8B, **change}, "bfloat16")


def test_unsupported_attention_windows_are_refused():
    with pytest.raises(UnsupportedModelError, match="sliding_window=4096"):
        to_model_config({**MISTRAL_7B_V03, "sliding_window": 4096}, "bfloat16")   # Mistral 7B v0.1
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        to_model_config({**QWEN25_05B, "use_sliding_window": True, "sliding_window": 4096}, "bfloat16")
    assert to_model_config({**MISTRAL_7B_V03, "sliding_window": 32768}, "bfloat16")  # covers the context
    assert set(supported_architectures()) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                              "Qwen3ForCausalLM"}


def _tiny(family, **kw):
    from megatron_rl.utils.tiny import tiny_hf_config

    cfg = tiny_hf_config(family, vocab_size=300, num_heads=8, num_kv_heads=kw.pop("kv", 4), hidden_size=128, **kw)
    hf = cfg.to_dict()
    hf["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                            "mistral": "MistralForCausalLM"}[family]]
    mc = to_model_config(hf, "float32")
    torch.manual_seed(0)
    tensors = {name: torch.randn(shape) for name, shape in hf_tensor_specs(mc)}
    return mc, tensors


@pytest.mark.parametrize("family,kw", [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {}),
                                       ("mistral", {"kv": 8})])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_weights_round_trip_bit_exactly(family, kw, tp):
    cfg, tensors = _tiny(family, **kw)
    source = DictSource(tensors)
    seen = set()
    for e in model_entries(cfg):
        shards = [to_megatron(cfg, e, source, r, tp) for r in range(tp)]
        if e.kind == "vocab":
            assert all(s.shape[0] == cfg.padded_vocab_size(tp) // tp for s in shards)
            assert torch.cat(shards)[cfg.vocab_size:].abs().sum() == 0  # Megatron's padding rows
        if not e.export:
            continue
        for name, full in to_hf(cfg, e, shards):
            assert torch.equal(full, tensors[name]), name
            seen.add(name)
    assert seen == set(tensors)


@pytest.mark.parametrize("family,kw", [("qwen2", {"tie_word_embeddings": True}), ("qwen3", {})])
@pytest.mark.parametrize("tp", [2, 4])
def test_a_whole_megatron_tensor_is_cut_like_the_hf_tensors(family, kw, tp):
    """shard_full (what megatron.init cuts its draws with) gives to_megatron's shards, from the TP = 1
    tensor of full_shape; entry_of finds every entry by its Megatron name."""
    from megatron_rl.convert import entry_of, full_shape, shard_full

    cfg, tensors = _tiny(family, **kw)
    source = DictSource(tensors)
    for e in model_entries(cfg):
        assert entry_of(cfg, e.mcore) == e
        whole = to_megatron(cfg, e, source, 0, 1)
        rows = cfg.vocab_size if e.kind == "vocab" else whole.shape[0]   # full_shape: the unpadded vocabulary
        assert full_shape(cfg, e) == [rows] + list(whole.shape[1:])
        for r in range(tp):
            assert torch.equal(shard_full(cfg, e, whole, r, tp), to_megatron(cfg, e, source, r, tp)), e.mcore
    with pytest.raises(ValueError, match="no mapping for the Megatron tensor decoder.layers.0.bogus"):
        entry_of(cfg, "decoder.layers.0.bogus")


def test_qkv_interleaving_follows_megatron_gqa_layout():
    """8 q heads, 4 KV groups, TP 2: rank r holds groups 2r, 2r+1, each as [q, q, k, v] heads."""
    cfg, _ = _tiny("qwen2")
    hd = cfg.head_dim
    q = torch.arange(8).repeat_interleave(hd).float()[:, None].expand(-1, cfg.hidden_size)          # q head h -> h
    k = (100 + torch.arange(4)).repeat_interleave(hd).float()[:, None].expand(-1, cfg.hidden_size)  # k group g
    v = (200 + torch.arange(4)).repeat_interleave(hd).float()[:, None].expand(-1, cfg.hidden_size)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.self_attn.v_proj.weight")
    entry = next(e for e in model_entries(cfg) if e.mcore == "decoder.layers.0.self_attention.linear_qkv.weight")
    source = DictSource(dict(zip(names, (q, k, v))))
    heads = [to_megatron(cfg, entry, source, r, 2)[::hd, 0].tolist() for r in range(2)]
    assert heads == [[0, 1, 100, 200, 2, 3, 101, 201], [4, 5, 102, 202, 6, 7, 103, 203]]


def test_gate_up_fused_per_rank():
    cfg, tensors = _tiny("llama")
    entry = next(e for e in model_entries(cfg) if e.mcore == "decoder.layers.1.mlp.linear_fc1.weight")
    shard = to_megatron(cfg, entry, DictSource(tensors), 1, 2)
    f = cfg.ffn_hidden_size // 2
    assert torch.equal(shard[:f], tensors["model.layers.1.mlp.gate_proj.weight"][f:])
    assert torch.equal(shard[f:], tensors["model.layers.1.mlp.up_proj.weight"][f:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_reader_and_streaming_writer(tmp_path, monkeypatch, dtype):
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {"a": torch.randn(37, 19).to(dtype), "b": torch.randn(5).to(dtype), "c": torch.randn(3, 4, 6).to(dtype)}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    monkeypatch.setattr(safetensors_io, "_CHUNK_BYTES", 64)  # column reads in many row chunks
    f = safetensors_io.SafetensorsFile(tmp_path / "ref.safetensors")
    assert torch.equal(f.read("a"), tensors["a"]) and torch.equal(f.read("c"), tensors["c"])
    assert torch.equal(f.read("a", 0, 3, 11), tensors["a"][3:11])
    assert torch.equal(f.read("a", 1, 5, 17), tensors["a"][:, 5:17])
    assert torch.equal(f.read("c", 0, 1, 3), tensors["c"][1:3])
    # the writer: header first, tensors in any order, readable by the reference implementation
    w = SafetensorsWriter(tmp_path / "out.safetensors", [(k, t.dtype, t.shape) for k, t in tensors.items()])
    for k in ("c", "a", "b"):
        w.write(k, tensors[k])
    w.close()
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        assert set(fh.keys()) == set(tensors)
        for k in tensors:
            assert torch.equal(fh.get_tensor(k), tensors[k])
    w = SafetensorsWriter(tmp_path / "short.safetensors", [("a", dtype, [37, 19]), ("b", dtype, [5])])
    w.write("a", tensors["a"])
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_reader_detects_truncation_and_missing_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    HFCheckpoint(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(safetensors_io.CheckpointError, match="truncated or corrupt .* header describes"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:20])
    with pytest.raises(safetensors_io.CheckpointError, match="truncated"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(safetensors_io.CheckpointError, match="convert it to safetensors"):
        HFCheckpoint(tmp_path)


def test_export_plan_covers_each_tensor_once_per_stage():
    cfg = to_model_config(QWEN3_06B, "bfloat16")
    for pp in (1, 2, 4):
        plan = export_plan(cfg, pp, parse_size("1GB"))
        names = [n for f in plan for n, _ in f.tensors]
        assert sorted(names) == sorted(n for n, _ in hf_tensor_specs(cfg)) and len(names) == len(set(names))
        assert "lm_head.weight" not in names  # tied
        for f in plan:
            assert f.nbytes(torch.bfloat16) <= 10**9 or len(f.tensors) == 1
        stage_by_name = {n: stage_of(cfg, e, pp) for e in model_entries(cfg) for n in e.hf if e.export}
        assert all(stage_by_name[n] == f.stage for f in plan for n, _ in f.tensors)
        assert {f.stage for f in plan} == set(range(pp))
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("300KB") == 300000


def test_generation_config_written_when_the_source_had_none(tmp_path):
    from transformers import GenerationConfig

    from megatron_rl.convert.layout import write_generation_config

    write_generation_config(tmp_path, {**QWEN3_06B, "eos_token_id": 151645, "bos_token_id": None, "pad_token_id": 7})
    gen = GenerationConfig.from_pretrained(tmp_path)
    assert gen.eos_token_id == 151645 and gen.pad_token_id == 7 and gen.bos_token_id is None
