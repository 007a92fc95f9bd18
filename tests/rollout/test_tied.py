"""A tied-embedding model in the engine: the LM head is the embedding's own parameter, and nothing in a
checkpoint names it. After a weight sync the engine must SCORE with the new head (behaviour), not only
hold the new tensor (state): on CPU the head keeps a repacked copy that a plain in-place reload never
rebuilds (tied models stayed on the old output projection, with a read-back reporting 0 difference).

One fp32 engine (exactness), Llama-3.2-shaped: tied, GQA (4 heads, 2 KV heads), llama3 RoPE scaling.
"""

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.rollout import read_engine_weights, sync_weights, token_logprobs, verify_weights
from megatron_rl.rollout.mismatch import compare_probe
from tests.rollout.conftest import prompt_ids

QUESTIONS = ["What is 12 + 7?", "What is 3 * 4?", "What is 50 - 8?"]
ATOL = 2e-4    # fp32 engine vs HF (platform.md measured 2.5e-5 for processed_logprobs at T = 0.7)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rl.utils.tiny import make_small_family

    path = make_small_family(tmp_path_factory.mktemp("tied"), "llama3.2", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return path, AutoTokenizer.from_pretrained(path), model


@pytest.fixture(scope="module")
def tied_engine(tied):
    pytest.importorskip("vllm")
    from megatron_rl.rollout import EngineConfig, RolloutEngine

    cfg = EngineConfig(model=str(tied[0]), dtype="float32", temperature=0.7, n_samples=2, max_response_tokens=12,
                       max_model_len=256, seed=0, kv_cache_memory_bytes=64 << 20, gpu_memory_utilization=0.1)
    eng = RolloutEngine(cfg)
    yield eng
    eng.shutdown()


def _hf_logprobs(model, rollout, temperature):
    """HF's log-probs of each sample's response tokens, [T_i] per sample."""
    out = []
    with torch.no_grad():
        for s in rollout.samples:
            p, t = s.prompt_ids.numel(), s.num_response_tokens
            out.append(token_logprobs(model(s.tokens[None]).logits[0, p - 1: p + t - 1], s.response_ids, temperature))
    return out


def _perturbed(sd, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def test_tied_head_follows_the_synced_embedding(tied_engine, tied):
    path, tok, model = tied
    original = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in original          # a tied checkpoint has no head tensor
    prompts = prompt_ids(tok, QUESTIONS)
    temp = tied_engine.config.temperature
    new = _perturbed(original, seed=1)
    try:
        sync_weights(tied_engine, new.items(), max_bucket_bytes=64 << 10)
        check = verify_weights(tied_engine, new.items())
        assert check.ok and check.max_abs_diff == 0.0, check.summary()
        assert check.num_checked == len(new) + 1     # + the head's derived copy, checked as lm_head.weight
        after = tied_engine.probe(prompts, max_tokens=12)[0]
        model.load_state_dict(new, strict=False)    # tied: lm_head follows embed_tokens
        probe = compare_probe([after], [_hf_logprobs(model, after, temp)], tolerance=ATOL)
        assert probe.ok, probe.summary()
        # the defect's signature: new body with the OLD head would score these tokens very differently
        stale = {**new, "model.embed_tokens.weight": original["model.embed_tokens.weight"]}
        model.load_state_dict(stale, strict=False)
        assert compare_probe([after], [_hf_logprobs(model, after, temp)], ATOL).max_abs_diff > 0.1
    finally:
        model.load_state_dict(original, strict=False)
        sync_weights(tied_engine, original.items())
    assert verify_weights(tied_engine, original.items()).ok


def test_readback_and_probe_see_a_stale_tied_head(tied_engine, tied, tmp_path):
    """vLLM's own from-disk reload has no fix for the tied head, so it rebuilds exactly the defect: the
    embedding holds the new weights while the head's derived copy keeps the old ones."""
    from safetensors.torch import save_file

    path, tok, model = tied
    original = load_file(str(path / "model.safetensors"))
    new = _perturbed(original, seed=2)
    disk = tmp_path / "new"
    disk.mkdir()
    for f in path.iterdir():
        if f.suffix in (".json", ".txt") or f.name.startswith("tokenizer"):
            (disk / f.name).write_bytes(f.read_bytes())
    save_file(new, str(disk / "model.safetensors"))
    temp = tied_engine.config.temperature
    prompts = prompt_ids(tok, QUESTIONS)
    try:
        tied_engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(disk)})
        tied_engine.reset_prefix_cache()
        check = verify_weights(tied_engine, new.items())
        assert not check.ok and set(check.mismatched) == {"lm_head.weight"}, check.summary()
        assert check.mismatched["lm_head.weight"] > 0.05
        rollout = tied_engine.probe(prompts, max_tokens=12)[0]
        model.load_state_dict(new, strict=False)
        probe = compare_probe([rollout], [_hf_logprobs(model, rollout, temp)], tolerance=ATOL)
        assert not probe.ok and probe.max_abs_diff > 0.1
        assert "token id" in probe.summary() and "tolerance" in probe.summary()
        # our sync of the same weights re-derives the head: read-back and probe agree again
        sync_weights(tied_engine, new.items())
        assert verify_weights(tied_engine, new.items()).ok
        rollout = tied_engine.probe(prompts, max_tokens=12)[0]
        assert compare_probe([rollout], [_hf_logprobs(model, rollout, temp)], tolerance=ATOL).ok
        assert set(read_engine_weights(tied_engine)) == set(original)
    finally:
        model.load_state_dict(original, strict=False)
        sync_weights(tied_engine, original.items())
