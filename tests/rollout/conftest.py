"""One tiny Qwen2 model (QKV bias, so fused groups include biases) and ONE vLLM engine for every rollout
test: an engine start costs 15-40 s on the CPU machines. The engine runs in the default multiprocess
mode, so every weight-sync payload really crosses a process boundary."""

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from megatron_rl.utils.tiny import make_tiny_hf_model, make_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen2")
    tok = make_tiny_tokenizer(path)
    make_tiny_hf_model("qwen2", path, vocab_size=len(tok), tokenizer=tok, seed=0)
    return path, tok


@pytest.fixture(scope="session")
def engine(tiny_model):
    pytest.importorskip("vllm")
    from megatron_rl.rollout import EngineConfig, RolloutEngine

    path, _ = tiny_model
    cfg = EngineConfig(model=str(path), dtype="float32", temperature=0.7, n_samples=4, max_response_tokens=16,
                       max_model_len=256, logprobs_topk=5, seed=0, kv_cache_memory_bytes=64 << 20, gpu_memory_utilization=0.1)
    eng = RolloutEngine(cfg)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model[0], dtype=torch.float32)
    return model.eval()


def prompt_ids(tok, questions):
    return [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        tokenize=False), add_special_tokens=False)["input_ids"] for q in questions]
