"""Step time and peak memory of the policy losses in one Megatron training step, relative to `ppo`.

    .venv/bin/python tools/bench_step.py                       # tiny-to-small model on CPU, ~2 minutes
    .venv/bin/python tools/bench_step.py --hidden 512 --layers 8 --seq 1024 --out docs/bench_step.md

One full step (forward, backward, distributed optimizer) on a single rank (TP1 PP1 DP1, gloo), same
model, same data, same packing for every mode; the modes differ only in the loss (top-K ids add a
gather at K + 1 ids per token; CPPO adds its segmented scan). Each mode runs in its own process, in
rounds (ppo, cppo, dppo_topk_kl, ppo, ...), so the peak RSS (ru_maxrss) is the mode's own and slow
drifts of a shared machine hit every mode alike. Reported: median step time over all rounds, ratio to
ppo (all modes interleaved step by step in one process, so drifts of a shared machine hit each
alike), peak RSS above the process's RSS after building the model (one process per mode).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MODES = ("ppo", "cppo", "dppo_topk_kl")


def _loss_cfg(mode, topk):
    from megatron_rl.losses.config import LossConfig

    if mode == "cppo":
        return LossConfig(mode="cppo", divergence="topk_tv", horizon="sequence", topk=topk)
    if mode == "dppo_topk_kl":
        return LossConfig(mode="dppo_topk_kl", topk=topk)
    return LossConfig(mode="ppo")


def _samples(n, seq, vocab, topk, seed=0):
    import torch

    from megatron_rl.megatron.packing import TrainingSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        mask = torch.zeros(L)
        mask[L // 4:] = 1
        probs = torch.softmax(torch.randn(L, topk, generator=g), -1) * 0.5
        out.append(TrainingSample(tokens=torch.randint(0, vocab, (L,), generator=g), loss_mask=mask,
                                  advantages=torch.full((L,), float(torch.randn(1, generator=g))),
                                  rollout_logprobs=(torch.rand(L, generator=g) * 0.5 + 1e-3).log(),
                                  rollout_topk_ids=torch.randint(0, vocab, (L, topk), generator=g),
                                  rollout_topk_logprobs=probs.sort(-1, descending=True)[0].log()))
    return out


def worker(args) -> dict:
    """args.mode in this process (peak memory), or 'all': the modes interleaved step by step on one
    model (step time: machine drift hits every mode alike)."""
    import torch
    import torch.distributed as dist

    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.policy import policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig
    from megatron_rl.megatron.training import OptimConfig, build_training
    from megatron_rl.model_config import ModelConfig

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
    cfg = ModelConfig(family="qwen3", vocab_size=args.vocab, hidden_size=args.hidden,
                      ffn_hidden_size=args.hidden * 3, num_layers=args.layers, num_attention_heads=args.heads,
                      num_query_groups=max(1, args.heads // 2), qk_layernorm=True)
    ps = initialize_parallel(model_cfg=cfg)
    chunks, opt = build_training(cfg, ps, OptimConfig(lr=1e-5, bf16=args.bf16),
                                 init=lambda m: init_params_(m, cfg, ps, seed=0))
    modes = MODES if args.mode == "all" else (args.mode,)
    fns = {m: policy_loss_fn(cfg, ps, _loss_cfg(m, args.topk)) for m in modes}
    actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=args.seq * args.per_mb,
                                                   max_response_length=args.seq), fns[modes[0]])
    samples = _samples(args.batch, args.seq, args.vocab, args.topk)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = {m: [] for m in modes}
    for i in range(args.warmup + args.steps):
        for m in modes:
            actor.loss_fn = fns[m]
            t = time.perf_counter()
            actor.train_minibatch(samples)
            if i >= args.warmup:
                times[m].append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dist.destroy_process_group()
    return {"times": times, "peak_rss_mb": peak / 1024, "extra_rss_mb": (peak - base) / 1024,
            "tokens": sum(s.length for s in samples)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256, help="max sequence length (prompt + response)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--per-mb", type=int, default=4, help="microbatch budget in max-length sequences")
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None, help="append a markdown table to this file")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:   # worker process
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    port = 29600 + os.getpid() % 1000
    forward = [a for a in sys.argv[1:] if a != "--out" and not a.endswith(".md")]

    def run(mode, steps, warmup):
        nonlocal port
        port += 1
        cmd = [sys.executable, __file__, "--mode", mode, "--port", str(port), *forward,
               "--steps", str(steps), "--warmup", str(warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise SystemExit(f"worker {mode} failed:\n{out.stderr[-4000:]}")
        return json.loads(line[0][7:])

    results = {m: [] for m in MODES}
    for _ in range(args.rounds):          # step time: all modes interleaved in one process
        for m, t in run("all", args.steps, args.warmup)["times"].items():
            results[m] += t
    peaks = {m: [run(m, 1, 1)["extra_rss_mb"]] for m in MODES}   # peak memory: one process per mode
    med = {m: statistics.median(results[m]) for m in MODES}
    rows = [f"| {m} | {med[m] * 1e3:.1f} | {med[m] / med['ppo']:.3f} | {max(peaks[m]):.0f} | "
            f"{max(peaks[m]) - max(peaks['ppo']):+.0f} |" for m in MODES]
    table = "\n".join([
        f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; "
        f"{args.batch} sequences of {args.seq // 2}-{args.seq} tokens per step, microbatch budget "
        f"{args.seq * args.per_mb} tokens, top-K {args.topk}, {'bf16' if args.bf16 else 'fp32'}, "
        f"{args.threads} threads; {args.rounds} rounds x {args.steps} steps per mode; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "",
        "| mode | median step (ms) | vs ppo | peak RSS above model (MB) | vs ppo (MB) |",
        "|---|---|---|---|---|", *rows, ""])
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
