"""Reading the engine's weights back at tensor_parallel_size > 1, where each worker holds a slice.

Two levels:
- real vLLM layers (QKV / MergedColumn / RowParallel / VocabParallelEmbedding / ParallelLMHead) built in
  this process for every rank of TP 2, 4 and 8 (vLLM's TP rank / size functions patched), filled by
  vLLM's own weight loaders, then verified and read back through the worker methods and the driver's
  merge: the slicing agrees with vLLM's at layouts a 2-core machine cannot start an engine for.
- a real TP=2 engine (slow): sync, verify, single-element corruption caught by name, generation
  following the synced weights (checked against HF's log-probs, as the TP=1 engine is in test_weight_sync).
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_rl.rollout.engine import cpu_thread_binding
from megatron_rl.rollout.weight_sync import merge_worker_checks, read_engine_weights, verify_weights


# ---- pure driver-side logic ----------------------------------------------------------------------------
def test_cpu_thread_binding_splits_cores_when_numa_nodes_are_short():
    assert cpu_thread_binding(1, 1, [0, 1]) is None                 # TP 1: vLLM's auto binding works
    assert cpu_thread_binding(2, 2, [0, 1]) is None                 # a NUMA node per worker: auto works
    assert cpu_thread_binding(2, 1, [1, 0]) == "0|1"
    assert cpu_thread_binding(2, 1, range(8)) == "0,1,2|3,4,5"      # 2 cores left to the scheduler
    assert cpu_thread_binding(4, 1, range(6)) == "0|1|2|3"
    with pytest.raises(ValueError, match="`tensor_parallel_size` 4 on CPU"):
        cpu_thread_binding(4, 1, [0, 1])


def test_merge_worker_checks_takes_the_worst_worker():
    w0 = {"diffs": {"a": 0.0, "b": 0.5, "c": 0.0, "d": 0.0}, "missing": ["m"], "shapes": {}}
    w1 = {"diffs": {"a": 0.25, "b": 0.0, "c": float("nan"), "m": 0.0}, "missing": [],
          "shapes": {"d": [[4, 2], [4, 3]]}}
    res = merge_worker_checks([w0, w1])
    assert res["diffs"]["a"] == 0.25 and res["diffs"]["b"] == 0.5 and res["diffs"]["c"] != res["diffs"]["c"]
    assert "d" not in res["diffs"] and res["shapes"] == {"d": [[4, 2], [4, 3]]}
    assert res["missing"] == ["m"] and "m" not in res["diffs"]
    assert merge_worker_checks([w0]) == {"diffs": {"a": 0.0, "b": 0.5, "c": 0.0, "d": 0.0}, "missing": ["m"],
                                         "shapes": {}}


# ---- real vLLM layers, every rank of a TP group, in this process ------------------------------------------
HIDDEN, HEAD, HEADS, INTER, VOCAB = 64, 16, 8, 128, 300   # VOCAB pads to 320: the last rank holds padding


class _Engine:
    """collective_rpc as vLLM's: every worker runs the method, answers in rank order. A worker is the
    extension alone: its methods only need `model_runner.get_model()`."""

    def __init__(self, models):
        from megatron_rl.rollout.worker_ext import WeightSyncExtension

        self.workers = []
        for model in models:
            w = WeightSyncExtension()
            w.model_runner = SimpleNamespace(get_model=lambda m=model: m)
            self.workers.append(w)

    def collective_rpc(self, method, args=()):
        return [getattr(w, method)(*args) for w in self.workers]


def hf_weights(kv_heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)   # noqa: E731
    pre = "model.layers.0."
    return {"model.embed_tokens.weight": r(VOCAB, HIDDEN),
            pre + "self_attn.q_proj.weight": r(HEADS * HEAD, HIDDEN), pre + "self_attn.q_proj.bias": r(HEADS * HEAD),
            pre + "self_attn.k_proj.weight": r(kv_heads * HEAD, HIDDEN), pre + "self_attn.k_proj.bias": r(kv_heads * HEAD),
            pre + "self_attn.v_proj.weight": r(kv_heads * HEAD, HIDDEN), pre + "self_attn.v_proj.bias": r(kv_heads * HEAD),
            pre + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD), pre + "self_attn.o_proj.bias": r(HIDDEN),
            pre + "mlp.gate_proj.weight": r(INTER, HIDDEN), pre + "mlp.up_proj.weight": r(INTER, HIDDEN),
            pre + "mlp.down_proj.weight": r(HIDDEN, INTER), pre + "input_layernorm.weight": r(HIDDEN),
            pre + "mlp.gate.weight": r(4, HIDDEN),
            "lm_head.weight": r(VOCAB, HIDDEN)}


@pytest.fixture(scope="module")
def vllm_layers():
    """(build(tp, rank, kv_heads, hf, repack) -> model holding rank's slices, loaded by vLLM's loaders)."""
    pytest.importorskip("vllm")
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    import vllm.model_executor.parameter as parameter
    from vllm.config import VllmConfig, set_current_vllm_config

    where = {"tp": 1, "rank": 0}
    patched = [(m, f) for m in (linear, vocab, parameter)
               for f in ("get_tensor_model_parallel_world_size", "get_tensor_model_parallel_rank")]
    saved = [getattr(m, f) for m, f in patched]
    for m, f in patched:   # layers ask these at construction; no process group is needed for that
        setattr(m, f, (lambda: where["tp"]) if f.endswith("world_size") else (lambda: where["rank"]))
    config = VllmConfig()

    def build(tp, rank, kv_heads, hf, repack):
        where.update(tp=tp, rank=rank)
        f32 = dict(params_dtype=torch.float32)
        with set_current_vllm_config(config):
            model = torch.nn.Module()
            model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                            "gate_up_proj": ["gate_proj", "up_proj"]}
            model.model = torch.nn.Module()
            model.model.embed_tokens = vocab.VocabParallelEmbedding(VOCAB, HIDDEN, **f32)
            layer = torch.nn.Module()
            layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
            layer.self_attn.qkv_proj = linear.QKVParallelLinear(HIDDEN, HEAD, HEADS, kv_heads, bias=True, **f32)
            layer.self_attn.o_proj = linear.RowParallelLinear(HEADS * HEAD, HIDDEN, bias=True, **f32)
            layer.mlp.gate_up_proj = linear.MergedColumnParallelLinear(HIDDEN, [INTER] * 2, bias=False, **f32)
            layer.mlp.down_proj = linear.RowParallelLinear(INTER, HIDDEN, bias=False, **f32)
            layer.mlp.gate = linear.ReplicatedLinear(HIDDEN, 4, bias=False, **f32)   # e.g. an MoE router
            layer.input_layernorm = torch.nn.Module()
            layer.input_layernorm.weight = torch.nn.Parameter(torch.empty(HIDDEN), requires_grad=False)
            model.model.layers = torch.nn.ModuleList([layer])
            model.lm_head = vocab.ParallelLMHead(VOCAB, HIDDEN, **f32)
        # what the model's load_weights does per HF name: the fused ones carry their shard id
        stacked = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                   "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        for name, t in hf.items():
            path, _, leaf = name.rpartition(".")
            parent, _, mod = path.rpartition(".")
            if mod in stacked:
                module = model.get_submodule(f"{parent}.{stacked[mod][0]}")
                param = getattr(module, leaf)
                param.weight_loader(param, t, stacked[mod][1])
            else:
                param = model.get_parameter(name)
                loader = getattr(param, "weight_loader", None)
                loader(param, t) if loader else param.data.copy_(t)
        if repack:   # the CPU oneDNN repack leaves an empty weight behind (read through the probe)
            for m in model.modules():
                if isinstance(m, linear.LinearBase):
                    m.quant_method.process_weights_after_loading(m)
        return model

    yield build
    for (m, f), fn in zip(patched, saved):
        setattr(m, f, fn)


@pytest.mark.parametrize("tp,kv_heads,repack", [(1, 2, True), (2, 1, True), (2, 2, False), (4, 2, True),
                                                (4, 8, False), (8, 2, False), (8, 8, True)])
def test_slices_match_vllms_loaders_and_merge_per_worker(vllm_layers, tp, kv_heads, repack):
    hf = hf_weights(kv_heads)
    models = [vllm_layers(tp, r, kv_heads, hf, repack) for r in range(tp)]
    if repack:
        assert models[0].model.layers[0].self_attn.o_proj.weight.numel() == 0
    engine = _Engine(models)

    check = verify_weights(engine, hf.items())
    assert check.ok and check.max_abs_diff == 0.0 and check.num_checked == len(hf), check.summary()
    assert check.not_checked == []
    back = read_engine_weights(engine)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)

    # one element off in a row-parallel weight (last columns: the last rank's), in a replicated-or-split
    # k (last row), in the up half of gate_up, in the embedding's last real row (beside the padding),
    # in a row-parallel bias, a norm and a replicated linear (whole on every rank): each reported by
    # name, alone
    pre = "model.layers.0."
    wrong = {pre + "self_attn.o_proj.weight": (HIDDEN - 1, HEADS * HEAD - 1),
             pre + "self_attn.k_proj.weight": (kv_heads * HEAD - 1, 3),
             pre + "mlp.up_proj.weight": (INTER // 2 + 1, 5), "model.embed_tokens.weight": (VOCAB - 1, 7),
             "lm_head.weight": (0, 0), pre + "self_attn.o_proj.bias": (2,), pre + "input_layernorm.weight": (9,),
             pre + "mlp.gate.weight": (3, 1)}
    expected = {k: v.clone() for k, v in hf.items()}
    for name, idx in wrong.items():
        expected[name][idx] += 0.5
    check = verify_weights(engine, expected.items(), max_bucket_bytes=4096)
    assert set(check.mismatched) == set(wrong), check.summary()
    assert all(abs(d - 0.5) < 1e-6 for d in check.mismatched.values())

    # a learner tensor of the wrong shape is a shape mismatch in full-tensor terms, never a slice compare
    bad = {pre + "self_attn.k_proj.weight": torch.zeros(kv_heads * HEAD + HEAD, HIDDEN),
           "model.embed_tokens.weight": torch.zeros(VOCAB + 1, HIDDEN), "model.nope.weight": torch.zeros(1)}
    check = verify_weights(engine, bad.items())
    assert check.shape_mismatch == {pre + "self_attn.k_proj.weight": ((kv_heads * HEAD, HIDDEN),
                                                                       (kv_heads * HEAD + HEAD, HIDDEN)),
                                    "model.embed_tokens.weight": ((VOCAB, HIDDEN), (VOCAB + 1, HIDDEN))}
    assert check.missing == ["model.nope.weight"] and not check.ok


# ---- a real TP=2 engine --------------------------------------------------------------------------------
QUESTIONS = ["What is 12 + 7?", "What is 3 * 4?"]


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory):
    from megatron_rl.utils.tiny import make_tiny_hf_model, make_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen2_kv1")
    tok = make_tiny_tokenizer(path, vocab_size=300)   # pads to 320: rank 1 holds 20 padding rows
    # one KV head for TP 2: k / v replicated on both ranks (num_kv_head_replicas = 2); QKV biases; tied
    # embeddings (Qwen2.5 small): each rank's LM head shard is the embedding's, re-derived after a sync
    make_tiny_hf_model("qwen2", path, vocab_size=len(tok), tokenizer=tok, seed=3, num_kv_heads=1,
                       tie_word_embeddings=True)
    return path, tok


@pytest.fixture(scope="module")
def tp_engine(tp_model):
    pytest.importorskip("vllm")
    from megatron_rl.rollout import EngineConfig, RolloutEngine

    cfg = EngineConfig(model=str(tp_model[0]), dtype="float32", temperature=0.7, n_samples=2,
                       max_response_tokens=12, max_model_len=128, seed=0, tensor_parallel_size=2,
                       kv_cache_memory_bytes=32 << 20, gpu_memory_utilization=0.1)
    eng = RolloutEngine(cfg)
    yield eng
    eng.shutdown()


@pytest.mark.slow
def test_tp2_engine_sync_verify_and_generation(tp_engine, tp_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_rl.rollout import logprob_mismatch, sync_weights, token_logprobs
    from megatron_rl.rollout.mismatch import compare_probe
    from megatron_rl.rollout.weight_sync import serialize_bucket
    from tests.rollout.conftest import prompt_ids
    from tests.rollout.test_weight_sync import hf_rollout_logprobs, perturbed

    path, tok = tp_model
    original = load_file(str(path / "model.safetensors"))
    assert len(original["model.embed_tokens.weight"]) == 300 and "lm_head.weight" not in original
    checked = len(original) + 1        # + the tied head's derived copy, read back as lm_head.weight
    check = verify_weights(tp_engine, original.items())
    assert check.ok and check.max_abs_diff == 0.0 and check.num_checked == checked, check.summary()
    assert check.not_checked == []

    new = perturbed(original, seed=7)
    stats = sync_weights(tp_engine, new.items(), max_bucket_bytes=64 << 10)
    assert stats.num_tensors == len(new)
    check = verify_weights(tp_engine, new.items(), max_bucket_bytes=64 << 10)
    assert check.ok and check.max_abs_diff == 0.0 and check.num_checked == checked, check.summary()
    back = read_engine_weights(tp_engine)
    assert set(back) == set(new) and all(torch.equal(back[k], new[k]) for k in new)
    assert set(verify_weights(tp_engine, original.items()).mismatched) == set(original) | {"lm_head.weight"}

    # expected side one element off, each on a chosen rank's slice: reported by name, alone
    wrong = {"model.layers.1.self_attn.o_proj.weight": (0, 127),     # row-parallel, rank 1's columns
             "model.layers.0.self_attn.k_proj.weight": (31, 0),      # fused QKV, k replicated on both ranks
             "model.layers.1.mlp.up_proj.weight": (200, 1),          # fused gate_up, rank 1's rows of up
             "model.embed_tokens.weight": (299, 4)}                  # rank 1's last real vocabulary row
    expected = {k: v.clone() for k, v in new.items()}
    for name, idx in wrong.items():
        expected[name][idx] += 0.25
    check = verify_weights(tp_engine, expected.items())
    wrong["lm_head.weight"] = wrong["model.embed_tokens.weight"]    # the head is compared with the embedding
    assert set(check.mismatched) == set(wrong) and all(abs(d - 0.25) < 1e-6 for d in check.mismatched.values())

    # engine side one element off (loaded through vLLM into both ranks' slices of a row-parallel weight)
    o = "model.layers.0.self_attn.o_proj.weight"
    bad_o = new[o].clone()
    bad_o[5, 100] += 1.0
    tp_engine.collective_rpc("mrl_load_weights", args=(serialize_bucket([(o, bad_o)]),))
    check = verify_weights(tp_engine, new.items())
    assert set(check.mismatched) == {o} and abs(check.mismatched[o] - 1.0) < 1e-6
    tp_engine.collective_rpc("mrl_load_weights", args=(serialize_bucket([(o, new[o])]),))
    tp_engine.reset_prefix_cache()
    assert verify_weights(tp_engine, new.items()).ok

    # generation follows the synced weights: TP=2 mu == HF(new) log-probs within the TP=1 engine's
    # tolerance (test_weight_sync: 2e-4 in probability), and != HF(original)
    out = tp_engine.generate(prompt_ids(tok, QUESTIONS), step=1)
    mu = torch.cat([s.rollout_logprobs for s in out.samples])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert logprob_mismatch(hf_rollout_logprobs(hf, out, 0.7), mu)["logprob_diff_max"] > 1e-2
    hf.load_state_dict(new, strict=False)
    assert logprob_mismatch(hf_rollout_logprobs(hf, out, 0.7), mu)["prob_diff_max"] < 2e-4
    # the weight-sync probe at engine TP 2: behaviour equals HF(new) token by token
    probe = tp_engine.probe(prompt_ids(tok, QUESTIONS), max_tokens=8)
    with torch.no_grad():
        hf_lps = [token_logprobs(hf(s.tokens[None]).logits[0, s.prompt_ids.numel() - 1: -1], s.response_ids, 0.7)
                  for s in probe[0].samples]
    assert compare_probe(probe, [hf_lps], tolerance=1e-4).ok
