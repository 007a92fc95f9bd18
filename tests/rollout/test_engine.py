"""The engine's mu against HF's pi of the same model at the same weights (float32)."""

import pytest
import torch

from megatron_rl.rollout import EngineConfig, logprob_mismatch, logprobs_at, token_logprobs, topk_logprobs
from tests.rollout.conftest import prompt_ids

QUESTIONS = ["What is 12 + 7?", "What is 3 * 4?", "What is 50 - 8?"]
# platform.md measured 2.5e-5 between processed_logprobs and log_softmax(logits / T) at T = 0.7
ATOL = 2e-4


def hf_logits(model, sample):
    """pi's logits at the positions that predict the response tokens (position i predicts token i + 1)."""
    with torch.no_grad():
        logits = model(sample.tokens[None]).logits[0]
    p, t = sample.prompt_ids.numel(), sample.num_response_tokens
    return logits[p - 1: p + t - 1]


@pytest.fixture(scope="module")
def rollout(engine, tiny_model):
    prompts = prompt_ids(tiny_model[1], QUESTIONS)
    return engine.generate(prompts, prompt_indices=[10, 11, 12], step=0,
                           infos=[{"answer": "19"}, {"answer": "12"}, {"answer": "42"}])


def test_rollout_logprobs_and_topk_match_hf(engine, hf_model, rollout):
    k, temp = engine.config.logprobs_topk, engine.config.temperature
    assert rollout.topk == k and rollout.temperature == temp and len(rollout) == 3 * 4
    exact_positions = 0
    all_hf, all_mu = [], []
    for s in rollout.samples:
        t = s.num_response_tokens
        assert t > 0 and s.topk_ids.shape == (t, k) and s.topk_logprobs.shape == (t, k)
        logits = hf_logits(hf_model, s)
        lp = token_logprobs(logits, s.response_ids, temp)
        hf_ids, hf_vals = topk_logprobs(logits, k + 1, temp)
        torch.testing.assert_close(s.rollout_logprobs, lp, atol=ATOL, rtol=0)
        # mu's top-K log-probs in rank order equal pi's top-K values...
        torch.testing.assert_close(s.topk_logprobs, hf_vals[:, :k], atol=ATOL, rtol=0)
        # ...and at mu's ids pi gives the same values (ids right even where values nearly tie)
        torch.testing.assert_close(s.topk_logprobs, logprobs_at(logits, s.topk_ids, temp), atol=ATOL, rtol=0)
        # where no two of pi's top K+1 values are within 2*ATOL, the ids must be exactly pi's
        gaps = (hf_vals[:, :-1] - hf_vals[:, 1:]).min(dim=1).values
        clear = gaps > 2 * ATOL
        assert torch.equal(s.topk_ids[clear], hf_ids[clear, :k])
        exact_positions += int(clear.sum())
        # ids unique per row, values sorted, the sampled token's log-prob no larger than the top one
        assert all(len(set(row.tolist())) == k for row in s.topk_ids)
        assert (s.topk_logprobs[:, :-1] >= s.topk_logprobs[:, 1:]).all()
        assert (s.rollout_logprobs <= s.topk_logprobs[:, 0] + 1e-6).all()
        all_hf.append(lp)
        all_mu.append(s.rollout_logprobs)
    assert exact_positions >= 0.5 * sum(s.num_response_tokens for s in rollout.samples)
    m = logprob_mismatch(torch.cat(all_hf), torch.cat(all_mu))
    assert m["num_tokens"] > 0 and m["prob_diff_max"] < ATOL and m["logprob_diff_max"] < ATOL


def test_groups_metadata_and_stats(engine, rollout):
    assert [s.group_id for s in rollout.samples] == [g for g in range(3) for _ in range(4)]
    assert [s.sample_index for s in rollout.samples] == [0, 1, 2, 3] * 3
    assert [s.prompt_index for s in rollout.samples[::4]] == [10, 11, 12]
    assert rollout.samples[4].info == {"answer": "12"}
    assert {s.finish_reason for s in rollout.samples} <= {"stop", "length"}
    eos = engine.tokenizer.eos_token_id
    for s in rollout.samples:
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == eos   # the stop token is part of the response (and trained on)
        else:
            assert s.num_response_tokens == engine.config.max_response_tokens
    st = rollout.stats
    assert st["rollout/samples"] == 12 and st["rollout/response_tokens"] == sum(
        s.num_response_tokens for s in rollout.samples)
    assert st["rollout/tokens_per_second"] > 0
    # the samples of a group differ (different per-request seeds)
    assert len({tuple(s.response_ids.tolist()) for s in rollout.samples[:4]}) > 1
    batch = rollout.padded(pad_id=0)
    s = rollout.samples[0]
    p, t = s.prompt_ids.numel(), s.num_response_tokens
    assert torch.equal(batch["tokens"][0, : p + t], s.tokens)
    assert batch["response_mask"][0].sum() == t and batch["response_mask"][0, p] == 1
    assert torch.equal(batch["rollout_logprobs"][0, p: p + t], s.rollout_logprobs)
    assert torch.equal(batch["topk_ids"][0, p: p + t], s.topk_ids)


def test_per_request_seeds_reproduce_whatever_the_batch_order(engine, tiny_model, rollout):
    prompts = prompt_ids(tiny_model[1], QUESTIONS)
    again = engine.generate(prompts[::-1], prompt_indices=[12, 11, 10], step=0)
    by_key = {(s.prompt_index, s.sample_index): s for s in again.samples}
    for s in rollout.samples:
        o = by_key[(s.prompt_index, s.sample_index)]
        assert torch.equal(o.response_ids, s.response_ids)
        torch.testing.assert_close(o.rollout_logprobs, s.rollout_logprobs, atol=1e-6, rtol=0)
    later = engine.generate(prompts, prompt_indices=[10, 11, 12], step=1)
    assert any(not torch.equal(a.response_ids, b.response_ids) for a, b in zip(rollout.samples, later.samples))


def test_config_refuses_what_the_trainer_cannot_match():
    with pytest.raises(ValueError, match="`top_p`"):
        EngineConfig(model="m", top_p=0.9)
    with pytest.raises(ValueError, match="`top_k`"):
        EngineConfig(model="m", top_k=50)
    with pytest.raises(ValueError, match="`dtype`"):
        EngineConfig(model="m", dtype="auto")
    with pytest.raises(ValueError, match="`temperature`"):
        EngineConfig(model="m", temperature=0)
    with pytest.raises(ValueError, match="`extra_engine_args`"):
        EngineConfig(model="m", extra_engine_args={"logprobs_mode": "raw_logprobs"})
    with pytest.raises(ValueError, match="`max_num_batched_tokens`"):
        EngineConfig(model="m", max_model_len=4096, max_num_batched_tokens=2048)
    kw = EngineConfig(model="m", logprobs_topk=32).vllm_kwargs(cuda=False)
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["max_logprobs"] == 32
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] >= kw["max_model_len"]
    # on CPU the utilization is the host-memory share vLLM may reserve: always passed (vLLM's own 0.92
    # default refuses to start beside a learner); sleep mode is GPU only
    assert "enable_sleep_mode" not in kw and kw["gpu_memory_utilization"] == 0.5


def test_sleep_is_a_guarded_noop_on_cpu(engine, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("the CPU no-op path")
    engine.sleep()
    engine.wake_up()
    out = engine.generate(prompt_ids(tiny_model[1], QUESTIONS[:1]), n=1)
    assert len(out) == 1
