"""RolloutQueue's ordering, data positions and version stamps, with a recording stand-in for the engine
(the real engines are exercised end to end in test_loop.py and test_disaggregated.py)."""

from types import SimpleNamespace

import pytest

from megatron_rl.trainer.config import load_rl_config
from megatron_rl.trainer.rollouts import RolloutQueue, check_placement_env


class Loader:
    def __init__(self):
        self.position = 0

    def next_batch(self):
        self.position += 1
        return [SimpleNamespace(prompt_ids=[self.position], index=self.position, answer=str(self.position))]

    def state_dict(self):
        return {"position": self.position}


class LocalEngine:
    def __init__(self):
        self.calls, self.version = [], 0

    def generate(self, prompts, prompt_indices, step, infos):
        self.calls.append(("generate", step))
        return SimpleNamespace(step=step, prompts=prompts)


class Engine(LocalEngine):
    """Remote-engine-shaped: submit() starts work, the handle's result() stamps the version submitted with."""

    def submit(self, prompts, prompt_indices, step, infos):
        self.calls.append(("submit", step))
        version = self.version

        def result():
            self.calls.append(("result", step))
            return SimpleNamespace(step=step, prompts=prompts, weight_version=version)
        return SimpleNamespace(result=result)


def _run(queue, engine, steps):
    out = []
    for step in range(steps):
        records, rollout, data, metrics = queue.take(step)
        out.append((records[0].index, rollout.step if rollout else None, data["position"], metrics))
        if engine is not None:
            engine.version = step + 1     # the sync at the end of the step
        queue.weights_updated(step + 1)
    return out


def test_lag_one_submits_the_next_step_before_waiting_and_stamps_versions():
    engine, loader = Engine(), Loader()
    out = _run(RolloutQueue(engine, loader, lag=1, last_step=3, version=0), engine, 3)
    # step k+1 is submitted before step k's rollout is awaited, and never past the last step
    assert engine.calls == [("submit", 0), ("submit", 1), ("result", 0), ("submit", 2), ("result", 1),
                            ("result", 2)]
    assert [o[:2] for o in out] == [(1, 0), (2, 1), (3, 2)]          # prompts in data order, step-aligned
    assert [o[2] for o in out] == [1, 2, 3]       # data position after the step's own prompts, not the prefetch
    assert [o[3] for o in out] == [{"rollout/weight_version": 0, "rollout/off_policy_lag": 0},
                                   {"rollout/weight_version": 0, "rollout/off_policy_lag": 1},
                                   {"rollout/weight_version": 1, "rollout/off_policy_lag": 1}]
    assert loader.position == 3


def test_lag_zero_generates_on_demand_with_current_weights():
    engine, loader = LocalEngine(), Loader()
    out = _run(RolloutQueue(engine, loader, lag=0, last_step=3, version=5), engine, 3)
    assert engine.calls == [("generate", 0), ("generate", 1), ("generate", 2)]
    assert [o[3]["rollout/off_policy_lag"] for o in out] == [-5, 0, 0]   # version 5 at step 0: a resume would pass 0
    assert [o[2] for o in out] == [1, 2, 3]


def test_ranks_without_an_engine_draw_the_same_prompts():
    loader = Loader()
    out = _run(RolloutQueue(None, loader, lag=1, last_step=3, version=0), None, 3)
    assert [(o[0], o[1], o[2]) for o in out] == [(1, None, 1), (2, None, 2), (3, None, 3)]
    assert [o[3]["rollout/off_policy_lag"] for o in out] == [0, 1, 1]


def test_a_rollout_with_an_unexpected_version_is_refused():
    engine = Engine()
    queue = RolloutQueue(engine, Loader(), lag=1, last_step=3, version=0)
    queue.take(0)
    engine.version = 7            # an update the queue did not hear of, before step 2 was submitted
    queue.take(1)                 # submits step 2
    with pytest.raises(RuntimeError, match="rollout of step 2: engines generated with weight version 7, "
                                           "expected 0"):
        queue.take(2)


def test_lag_one_needs_an_engine_that_can_submit():
    # the one check: a colocated engine cannot generate while the learner trains (no `submit`)
    with pytest.raises(ValueError, match="rollout.placement: disaggregated"):
        load_rl_config({"model": {"checkpoint": "ckpt"}, "data": {"train_path": "d.jsonl"},
                        "rollout": {"max_off_policy_lag": 1}})


def test_disaggregated_placement_needs_the_rendezvous_environment(monkeypatch):
    monkeypatch.delenv("MRL_ENGINE_RENDEZVOUS", raising=False)
    monkeypatch.setenv("MRL_NUM_ENGINES", "1")
    with pytest.raises(ValueError, match="MRL_ENGINE_RENDEZVOUS is not set"):
        check_placement_env("disaggregated")
    check_placement_env("colocated")
