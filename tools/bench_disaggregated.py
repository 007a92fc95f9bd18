"""Benchmark: one-step off-policy overlap in disaggregated placement (lag 0 vs lag 1), on one machine.

    .venv/bin/python tools/bench_disaggregated.py [--steps 6] [--prompts 16] [--samples 8] [--response 32]

For each lag: one vLLM engine server process (`python -m megatron_rl.rollout.remote serve`) and a learner of
`--learner-ranks` torchrun ranks on loopback, the demo's tiny policy and task (built offline), then the mean
per-step phase times from metrics.jsonl (the first step is dropped: warm-up, and it is lag 0 in both runs).
`generate` is the learner's wait for its rollout: with lag 1 the rollout was submitted a step earlier, so
only what training did not cover remains; `sync` includes the wait for the in-flight generation, since
an update never lands mid-generation. Prints a markdown table (docs/disaggregated.md keeps the numbers).

On a 2-core machine the engine and the learner share the cores, so the overlap is bounded by CPU, not by
the schedule: the numbers show the mechanism, a GPU cluster is where it pays.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generate", "reward", "train", "sync", "step")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(lag: int, demo: dict, args, root: Path) -> list[dict]:
    run_dir = root / f"lag{lag}"
    rendezvous = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MRL_ENGINE_RENDEZVOUS=rendezvous,
               MRL_NUM_ENGINES="1", MEGATRON_RL_SECRET=secrets.token_hex(32))   # the job's control-channel secret
    log = open(root / f"engine_lag{lag}.log", "w")
    engine = subprocess.Popen([sys.executable, "-m", "megatron_rl.rollout.remote", "serve", "--rendezvous",
                               rendezvous, "--engine-rank", "0", "--num-engines", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    overrides = [f"run_dir={run_dir}", f"model.hf_path={demo['hf_path']}", f"data.train_path={demo['train_path']}",
                 f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts}",
                 f"rollout.n_samples={args.samples}", f"rollout.max_response_length={args.response}",
                 "rollout.placement=disaggregated", f"rollout.max_off_policy_lag={lag}", "checkpoint.every=0",
                 "checkpoint.export_hf=false", "logging.tensorboard=false", "logging.progress=false",
                 f"train.micro_batch_tokens={max(512, 32 + args.response)}"]
    try:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.learner_ranks}",
                        f"--master-port={free_port()}", "-m", "megatron_rl.trainer.cli", "train", "--config",
                        str(REPO / "examples" / "tiny_cpu" / "config.yaml"), *overrides],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        engine.wait(timeout=120)
    finally:
        try:
            os.killpg(engine.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        engine.wait()
        log.close()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--response", type=int, default=32, help="max response tokens")
    p.add_argument("--learner-ranks", type=int, default=1)
    args = p.parse_args()

    from megatron_rl.trainer.demo import DemoSpec, prepare_demo

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        demo = prepare_demo(root / "demo", DemoSpec(sft_steps=20, n_train=400, n_eval=8, sft_examples=100),
                            log=lambda *_: None)
        rows = {}
        for lag in (0, 1):
            t0 = time.perf_counter()
            history = run(lag, demo, args, root)
            rows[lag] = (history[1:], time.perf_counter() - t0)
    load = os.getloadavg()[0]
    print(f"\n{args.steps} steps x {args.prompts} prompts x {args.samples} samples, responses <= {args.response} "
          f"tokens, learner ranks {args.learner_ranks}, 1 engine; mean over steps 1..{args.steps - 1}; "
          f"load average {load:.1f} at the end\n")
    print("| lag | " + " | ".join(f"{p} s" for p in PHASES) + " | lag logged | response tokens | run s |")
    print("|---" * (len(PHASES) + 4) + "|")
    for lag, (hist, seconds) in rows.items():
        mean = {p: sum(r[f"time/{p}"] for r in hist) / len(hist) for p in PHASES}
        lags = sorted({int(r["rollout/off_policy_lag"]) for r in hist})
        tokens = sum(r["rollout/response_tokens"] for r in hist) / len(hist)
        print(f"| {lag} | " + " | ".join(f"{mean[p]:.2f}" for p in PHASES) +
              f" | {lags} | {tokens:.0f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
