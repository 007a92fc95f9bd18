"""The small tied-embedding families users start from (Llama 3.2, Qwen2.5, Qwen3 shapes; tiny, offline),
each through the real job: convert -> train 2 steps -> sync with the weight-sync probe after both steps ->
export -> reload in transformers. bf16 at temperature 0.7 where users run it, across the layouts where
tied-embedding bugs live (PP 2 puts the embedding and the output layer on different stages; TP 2 splits
the vocabulary of both). Then one real learner + engine process shows the probe refusing a corrupted bucket.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rl.utils.tiny import make_small_family
from tests.trainer.test_disaggregated import _free_port
from tests.trainer.test_loop import CONFIG, _hf_tensors, _rows

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# family preset: (tp, pp, dtype) - every tied layout of {1,2}^2 but TP1 x PP2, which the disaggregated
# end-to-end test runs with the tied demo model
CASES = {"llama3.2": (2, 2, "bfloat16"), "qwen2.5": (1, 1, "bfloat16"), "qwen3": (2, 1, "float32")}


def _train(args: list[str], nproc: int, cwd: Path, timeout: int = 900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
              "-m", "megatron_rl.trainer.cli"] if nproc > 1 else [sys.executable, "-m", "megatron_rl.trainer.cli"]
    proc = subprocess.run([*launch, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-8000:]}"
    return proc


@pytest.mark.parametrize("name", list(CASES))
def test_small_tied_family_convert_train_sync_export(tmp_path, demo, name):
    from transformers import AutoModelForCausalLM

    tp, pp, dtype = CASES[name]
    hf = make_small_family(tmp_path, name)
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"model.hf_path={hf}", f"data.train_path={demo['train_path']}",
                 "train.steps=2", "train.prompts_per_step=4", "rollout.n_samples=4", "checkpoint.every=0",
                 f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"model.dtype={dtype}",
                 f"rollout.dtype={dtype}", "rollout.temperature=0.7", "logging.tensorboard=false",
                 "reward.fn=tests.trainer._rewards:length"]    # an untrained model never scores an exact match
    _train(["train", "--config", str(CONFIG), *overrides], tp * pp, tmp_path)

    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1] and all(r["train/skipped"] == 0 for r in rows if "train/skipped" in r)
    from megatron_rl.rollout.mismatch import PROBE_TOLERANCE
    for r in rows:   # first_last: the probe ran after both syncs and the engine scored like the learner
        assert r["weight_sync/max_abs_diff"] == 0.0 and r["weight_sync/probe_logprob_diff_max"] <= PROBE_TOLERANCE[dtype], r
    print(f"{name} tp{tp} pp{pp} {dtype} T=0.7: mismatch at identical weights "
          f"|pi-mu| max {rows[0]['mismatch/prob_diff_max']:.3g}, |log pi - log mu| max "
          f"{rows[0]['mismatch/logprob_diff_max']:.3g}; probe after the updates "
          f"{[r['weight_sync/probe_logprob_diff_max'] for r in rows]}")

    # the export is a tied HF checkpoint of the trained weights
    before, after = _hf_tensors(hf), _hf_tensors(run_dir / "hf_final")
    assert before.keys() == after.keys() and "lm_head.weight" not in after
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert json.loads((run_dir / "hf_final" / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_final", dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, after["model.embed_tokens.weight"].float())


def test_probe_refuses_a_corrupted_bucket(tmp_path, demo):
    hf = make_small_family(tmp_path, "llama3.2", seed=1)
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "tests.trainer._probe_job", str(CONFIG), f"run_dir={run_dir}",
                           f"model.hf_path={hf}", f"data.train_path={demo['train_path']}", "rollout.temperature=0.7"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "probe job ok" in proc.stdout, f"STDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
