"""Engine-free pieces of the rollout package: the batch type, vLLM log-prob parsing, the mismatch metric."""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_rl.rollout import Rollout, Sample, logprob_mismatch, request_seed
from megatron_rl.rollout.engine import parse_logprobs


def sample(resp, group, k=0):
    t = len(resp)
    return Sample(prompt_ids=torch.tensor([1, 2, 3]), response_ids=torch.tensor(resp, dtype=torch.int64),
                  rollout_logprobs=-torch.arange(1, t + 1, dtype=torch.float32), finish_reason="stop",
                  prompt_index=group, group_id=group, sample_index=0,
                  topk_ids=torch.arange(t * k).view(t, k) if k else None,
                  topk_logprobs=-torch.ones(t, k) if k else None)


def test_parse_flat_logprobs_fixed_shape():
    # vLLM's flat layout: per position the sampled token, then the top K in rank order (the sampled
    # token appears twice when it is in the top K)
    flat = SimpleNamespace(start_indices=[0, 3], end_indices=[3, 6], token_ids=[7, 7, 9, 4, 7, 9],
                           logprobs=[-0.5, -0.5, -1.0, -3.0, -0.25, -2.0])
    lp, ids, lps = parse_logprobs(flat, [7, 4], k=2)
    assert lp.tolist() == [-0.5, -3.0]
    assert ids.tolist() == [[7, 9], [7, 9]] and lps.tolist() == [[-0.5, -1.0], [-0.25, -2.0]]
    empty = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[])
    lp, ids, lps = parse_logprobs(empty, [], k=2)
    assert lp.shape == (0,) and ids.shape == (0, 2)
    # the dict layout: K entries when the sampled token is in the top K, K + 1 when it is not
    lp_ = lambda v, r: SimpleNamespace(logprob=v, rank=r)   # noqa: E731
    dicts = [{7: lp_(-0.5, 1), 9: lp_(-1.0, 2)}, {4: lp_(-3.0, 2), 7: lp_(-0.25, 1), 9: lp_(-2.0, 2)}]
    lp, ids, lps = parse_logprobs(dicts, [7, 4], k=2)
    assert lp.tolist() == [-0.5, -3.0] and ids.tolist() == [[7, 9], [7, 9]]
    assert lps.tolist() == [[-0.5, -1.0], [-0.25, -2.0]]
    with pytest.raises(RuntimeError, match="not the sampled token"):
        parse_logprobs(flat, [8, 4], k=2)
    with pytest.raises(RuntimeError, match="expected"):
        parse_logprobs(flat, [7, 4], k=3)


def test_sample_and_rollout():
    with pytest.raises(ValueError, match="rollout_logprobs"):
        Sample(torch.tensor([1]), torch.tensor([2, 3]), torch.zeros(3), "stop", 0, 0, 0)
    with pytest.raises(ValueError, match="together"):
        Sample(torch.tensor([1]), torch.tensor([2]), torch.zeros(1), "stop", 0, 0, 0, topk_ids=torch.zeros(1, 2))
    r = Rollout([sample([5, 6], 0, k=2), sample([7], 1, k=2), sample([], 1, k=2)], topk=2)
    assert r.samples[0].tokens.tolist() == [1, 2, 3, 5, 6] and r.group_ids.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="no reward"):
        r.rewards
    r.set_rewards([1, 0, 0.5])
    assert r.rewards.tolist() == [1.0, 0.0, 0.5]
    assert len(r.select([True, False, True])) == 2
    b = r.padded(pad_id=0)
    assert b["tokens"].tolist() == [[1, 2, 3, 5, 6], [1, 2, 3, 7, 0], [1, 2, 3, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert b["rollout_logprobs"][0].tolist() == [0, 0, 0, -1, -2]
    assert b["topk_logprobs"].shape == (3, 5, 2) and b["topk_logprobs"][2].isinf().all()
    assert b["response_lengths"].tolist() == [2, 1, 0]


def test_request_seeds_are_stable_and_distinct():
    assert request_seed(0, 1, 2, 3) == request_seed(0, 1, 2, 3)
    seeds = {request_seed(0, s, p, j) for s in range(3) for p in range(20) for j in range(8)}
    assert len(seeds) == 3 * 20 * 8 and all(0 <= x < 2 ** 63 for x in seeds)


def test_logprob_mismatch_hand_values():
    pi = torch.log(torch.tensor([[0.5, 0.2], [0.9, 0.1]], dtype=torch.float64))
    mu = torch.log(torch.tensor([[0.4, 0.2], [0.6, 0.3]], dtype=torch.float64))
    mask = torch.tensor([[1, 1], [1, 0]])
    m = logprob_mismatch(pi, mu, mask)
    assert m["num_tokens"] == 3
    assert math.isclose(m["prob_diff_mean"], (0.1 + 0.0 + 0.3) / 3, rel_tol=1e-9)
    assert math.isclose(m["prob_diff_max"], 0.3, rel_tol=1e-9)
    assert math.isclose(m["logprob_diff_max"], math.log(1.5), rel_tol=1e-9)
    assert logprob_mismatch(pi, mu, torch.zeros(2, 2))["prob_diff_mean"] == 0.0


def test_compare_probe_names_the_worst_token():
    from megatron_rl.rollout.mismatch import compare_probe

    def rollout(lps, toks):
        return Rollout([Sample(prompt_ids=torch.tensor([1, 2]), response_ids=torch.tensor(t), rollout_logprobs=torch.tensor(l),
                               finish_reason="stop", prompt_index=i, group_id=i, sample_index=0)
                        for i, (l, t) in enumerate(zip(lps, toks))])

    engines = [rollout([[-1.0, -2.0], [-0.5]], [[7, 8], [9]]), rollout([[-1.0, -2.0], []], [[7, 8], []])]
    learner = [[torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])],
               [torch.tensor([-1.0, -2.3]), torch.tensor([])]]
    check = compare_probe(engines, learner, tolerance=0.1)
    assert not check.ok and check.num_tokens == 5 and abs(check.max_abs_diff - 0.3) < 1e-6
    assert check.worst == {"engine": 1, "sample": 0, "position": 1, "token": 8, "engine_logprob": -2.0,
                           "learner_logprob": pytest.approx(-2.3)}
    assert "engine 1, probe sequence 0, response position 1, token id 8" in check.summary()
    assert compare_probe(engines, learner, tolerance=0.5).ok
    learner[0][1] = torch.tensor([float("nan")])          # NaN never passes
    assert not compare_probe(engines, learner, tolerance=0.5).ok
    assert not compare_probe([rollout([[]], [[]])], [[torch.tensor([])]], tolerance=1.0).ok   # nothing compared
    with pytest.raises(ValueError, match="probe sequence 0 of engine 0"):
        compare_probe([rollout([[-1.0]], [[7]])], [[torch.tensor([-1.0, 0.0])]], tolerance=1.0)
