"""Every config error is raised at start-up, before anything is converted, started or loaded: through the
real command line a bad data path or a bad reward import fails in seconds and writes nothing (no run dir,
no converted base model, no checkpoints); in process, each start-up check names the key to change."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rl.trainer.config import load_rl_config
from megatron_rl.utils.tiny import make_small_family

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "tiny_cpu" / "config.yaml"
# the CLI's imports plus the checks: seconds, where a conversion and an engine start take minutes
FAST_S = 30


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A real tiny HF model and prompt file: with a good config the job would convert and train them."""
    root = tmp_path_factory.mktemp("startup")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(8)))
    return {"hf": make_small_family(root, "qwen2.5"), "data": data}


def _overrides(run_dir, job, **changes):
    keys = {"run_dir": run_dir, "model.hf_path": job["hf"], "data.train_path": job["data"], "train.steps": 1,
            "train.prompts_per_step": 2, "rollout.n_samples": 2, **changes}
    return [f"{k}={v}" for k, v in keys.items()]


@pytest.mark.parametrize("change,needles", [
    ({"data.train_path": "no/such/prompts.jsonl"},
     ["config section `data`: `train_path` 'no/such/prompts.jsonl' is not a file"]),
    ({"reward.fn": "tests.trainer.no_such_module:score"},
     ["`reward.fn`: reward 'tests.trainer.no_such_module:score': cannot import module"]),
])
def test_a_bad_data_path_or_reward_fails_in_seconds_writing_nothing(tmp_path, job, change, needles):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "megatron_rl.trainer.cli", "train", "--config", str(CONFIG),
                           *_overrides(run_dir, job, **change)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-6000:]
    assert seconds < FAST_S, f"the refusal took {seconds:.0f} s"
    # nothing written: no run dir (so no converted base model, no checkpoints, no logs)
    assert not run_dir.exists(), sorted(str(p) for p in run_dir.rglob("*"))


def _cfg(job, tmp_path, **changes):
    return load_rl_config(CONFIG, _overrides(tmp_path / "run", job, **changes))


def test_a_good_config_passes_the_start_up_check(job, tmp_path):
    _cfg(job, tmp_path).check_startup(world_size=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,world,needle", [
    ({"parallel.tensor": 3}, 3, "`parallel.tensor` / `parallel.pipeline`: tensor_model_parallel_size=3 does not "
                                "divide num_attention_heads"),
    ({"parallel.pipeline": 2}, 1, "world size 1 is not a multiple of parallel.tensor x parallel.pipeline"),
    ({"train.micro_batch_tokens": 16}, 1, "`train.micro_batch_tokens` = 16 is smaller than the longest sequence"),
    ({"rollout.engine_tensor_parallel": 3}, 1, "`rollout.engine_tensor_parallel` = 3 does not divide"),
    ({"parallel.context": 2}, 2, "set parallel.context: 1"),     # no transformer-engine on CPU
    ({"rollout.placement": "disaggregated"}, 1, "MRL_ENGINE_RENDEZVOUS is not set"),
    ({"model.hf_path": "no/such/model"}, 1, "`model.hf_path`: no/such/model holds no config.json"),
    ({"model.checkpoint": "no/such/ckpt"}, 1, "`model.checkpoint`: no/such/ckpt is not a converted checkpoint"),
    ({"data.train_path": "prompts.csv", "__touch": True}, 1, "`format` is auto but `train_path` 'prompts.csv'"),
])
def test_each_start_up_check_names_the_key(job, tmp_path, monkeypatch, change, world, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MRL_ENGINE_RENDEZVOUS", raising=False)
    monkeypatch.setenv("MRL_NUM_ENGINES", "1")
    if change.pop("__touch", False):
        (tmp_path / change["data.train_path"]).write_text("{}\n")
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        _cfg(job, tmp_path, **change).check_startup(world_size=world)
    assert needle in str(e.value)


@pytest.mark.parametrize("change,needles", [
    # a top-K divergence against pi_old would need pi_old's top-K ids, which nothing computes
    ({"loss.mode": "dppo_topk_tv", "loss.anchor": "old"}, ["`loss.mode` = 'dppo_topk_tv'", "`loss.anchor: old`",
                                                            "Set loss.anchor: rollout"]),
    ({"loss.mode": "cppo", "loss.divergence": "topk_kl", "loss.anchor": "old"},
     ["`loss.divergence` = 'topk_kl'", "`loss.anchor: old`"]),
    ({"loss.mode": "dppo_exact_tv"}, ["`loss.mode` = 'dppo_exact_tv'", "full-vocabulary divergence"]),
    ({"train.adam_beta1": 1.5}, ["`train.adam_beta1` must be in [0, 1)"]),
    ({"train.weight_decay": -0.1}, ["`train.weight_decay` must be >= 0"]),
])
def test_loss_and_optimizer_settings_the_job_cannot_run_are_refused_at_load(job, tmp_path, change, needles):
    with pytest.raises(ValueError) as e:
        _cfg(job, tmp_path, **change)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_the_engines_return_top_k_exactly_when_the_loss_needs_it(job, tmp_path):
    assert _cfg(job, tmp_path, **{"loss.mode": "dppo_topk_tv", "loss.topk": 5}).logprobs_topk == 5
    assert _cfg(job, tmp_path, **{"loss.mode": "dppo_binary_tv", "loss.anchor": "old"}).logprobs_topk == 0


@pytest.mark.parametrize("change,needle", [
    ({"train.lr": ".nan"}, "config key `train.lr` must be a finite number, got nan"),
    ({"train.lr": ".inf"}, "config key `train.lr` must be a finite number, got inf"),
    ({"train.clip_grad": "inf"}, "config key `train.clip_grad` must be a finite number, got inf"),
    ({"rollout.temperature": ".nan"}, "config key `rollout.temperature` must be a finite number"),
    ({"loss.tis_cap": ".inf"}, "`loss`: LossConfig.tis_cap: got inf"),   # LossConfig: no cap is null
    ({"reward.timeout_s": ".inf"}, "config key `reward.timeout_s` must be a finite number"),
    ({"reward.timeout_s": 0}, "`reward.timeout_s` must be > 0"),
    ({"reward.step_timeout_s": -1}, "`reward.step_timeout_s` must be > 0"),
])
def test_non_finite_and_bad_numbers_are_refused_at_load_naming_the_key(job, tmp_path, change, needle):
    with pytest.raises(ValueError) as e:
        _cfg(job, tmp_path, **change)
    assert needle in str(e.value)


def test_inf_is_allowed_where_it_means_something(job, tmp_path):
    # loss.delta_b = inf: the DPPO limit of the prefix-average budget
    assert _cfg(job, tmp_path, **{"loss.delta_b": ".inf"}).loss.delta_b == float("inf")
    cfg = _cfg(job, tmp_path)
    assert (cfg.reward.timeout_s, cfg.reward.step_timeout_s) == (30.0, 600.0)


def test_a_top_k_larger_than_the_vocabulary_is_refused_at_start_up(job, tmp_path):
    vocab = json.loads((Path(job["hf"]) / "config.json").read_text())["vocab_size"]
    cfg = _cfg(job, tmp_path, **{"loss.mode": "dppo_topk_tv", "loss.topk": vocab + 1})
    with pytest.raises(ValueError) as e:
        cfg.check_startup(world_size=1)
    assert f"`loss.topk` = {vocab + 1} is larger than the model's vocabulary (vocab_size = {vocab})" in str(e.value)
    _cfg(job, tmp_path, **{"loss.mode": "dppo_topk_tv", "loss.topk": vocab}).check_startup(world_size=1)
    # a mode without top-K asks the engines for none: its loss.topk is unused and not checked
    _cfg(job, tmp_path, **{"loss.mode": "dppo_binary_tv", "loss.topk": vocab + 1}).check_startup(world_size=1)
