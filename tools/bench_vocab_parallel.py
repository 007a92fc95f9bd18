"""Benchmark: forward + backward of per-token log-probs over a vocab-parallel logits shard, on CPU.

    python tools/bench_vocab_parallel.py                      # the full grid (V = 151936 / 128256, 4096 tokens)
    python tools/bench_vocab_parallel.py --tokens 512 --vocab 151936 --dtype fp32 --tp 1   # a quick look

Methods, each forward + backward of a scalar built from the per-token outputs:
  (a) megatron-core `tensor_parallel.vocab_parallel_cross_entropy` (the baseline every user runs)
  (b) ours, binary DPPO / CPPO path: log p(sampled token)             (vocab_parallel_logprobs)
  (b+H) ours, binary path plus the entropy (bonus / metric)          (vocab_parallel_token_stats)
  (b-ip) (b) with inplace_backward=True: the gradient overwrites the logits, as (a) does
  (c) ours, top-K path: log p at the rollout's top-20 ids + the sampled token   (K + 1 = 21 ids)
  (L) the Megatron step's whole binary loss: vocab_parallel_policy_loss(dppo_binary_tv) with
      inplace_backward=True, as megatron_rl.megatron.policy.policy_loss_fn calls it
  (d) the naive approach: all-gather the full vocabulary, log_softmax, gather target and top-K ids

Method: per (V, dtype, tp), one set of tp gloo processes (one thread each) runs the methods interleaved
(a, b, b+H, b-ip, c, L, then again), so a slow spell on a shared machine hits them alike. Rep 0 warms up.
Each run gets fresh logits (megatron-core overwrites its input); then the peak-RSS counter is reset
(`echo 5 > /proc/self/clear_refs`) and the RSS read. A run's time = wall clock of forward + backward
(torch.autograd.grad w.r.t. the logits) on the slowest rank. Reported time = the fastest of --reps runs
(the least-disturbed one on a shared machine); t/t(a) = min / min of (a); `med` = the median over rounds
of t(method) / t(a) within the same round, as a check. Peak extra memory = VmHWM - RSS before the
forward, max over runs and ranks: everything forward + backward allocates beyond the logits shard,
including the returned gradient (a new [N, V/tp] tensor, except in (a) fp32, (b-ip) and (L), which reuse
the logits' storage). (d) runs in its own processes beside its own (a) at --naive-tokens (its
full-vocabulary copies do not fit a shared 24 GB machine at 4096 tokens); its ratios are against that
(a). Bytes all-reduced per token: the payload of every all_reduce / all_gather call (torch.distributed
wrapped and counted) divided by the tokens; our constant [tp, 7] int64 validation all-reduce is per
call, not per token, and kept apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("a", "b", "b+H", "b-ip", "c", "L", "d")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
K = 20


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Counter:
    """Counts payload bytes of the collectives torch.distributed is asked to run."""

    def __init__(self, dist):
        self.bytes, self.calls, self.small = 0, 0, 0
        for name in ("all_reduce", "all_gather_into_tensor", "all_gather"):
            orig = getattr(dist, name)

            def wrapped(*args, _orig=orig, _name=name, **kwargs):
                t = args[1] if _name == "all_gather_into_tensor" else args[0]
                if isinstance(t, list):
                    t = args[1]
                n = t.numel() * t.element_size()
                if t.dtype.is_floating_point or _name != "all_reduce" or t.numel() > 64:
                    self.bytes += n
                else:   # our [tp, 7] int64 validation all-reduce: per call, not per token
                    self.small += n
                self.calls += 1
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapped)


def _rank(rank, tp, port, args, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")   # megatron-core's "no transformer-engine / apex" notices
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp,
                            timeout=datetime.timedelta(seconds=3600))
    from megatron_rl.losses import GlobalCounts, LossConfig
    from megatron_rl.parallel import (VocabShard, vocab_parallel_logprobs, vocab_parallel_policy_loss,
                                      vocab_parallel_token_stats)

    vocab, n, dtype = args["vocab"], args["tokens"], getattr(torch, DTYPES[args["dtype"]])
    vpad = -(-vocab // (128 * tp)) * (128 * tp)
    shard = VocabShard.megatron(rank, tp, vocab, vpad)
    group = dist.new_group(list(range(tp)))
    g = torch.Generator().manual_seed(1234 + rank)
    block = (torch.randn(64, shard.width, generator=g) * 2).to(dtype)
    gg = torch.Generator().manual_seed(99)                      # identical on every rank
    target = torch.randint(0, vocab, (n,), generator=gg)
    ids = torch.cat([target[:, None], torch.randint(0, vocab, (n, K), generator=gg)], dim=1)
    weights = torch.randn(n, K + 1, generator=gg)
    rollout = dict(tokens=target, rollout_logprobs=-5 * torch.rand(n, generator=gg) - 0.1,
                   advantages=weights[:, 0].clone(), loss_mask=torch.ones(n, dtype=torch.bool))
    loss_cfg = LossConfig(mode="dppo_binary_tv", loss_agg_mode="token-mean")
    counts = GlobalCounts(num_tokens=n, num_sequences=1)

    def fresh():
        """New logits [n, W] each run (megatron-core overwrites its input), tiled from a random block."""
        x = torch.empty(n, shard.width, dtype=dtype)
        for i in range(0, n, 64):
            x[i:i + 64] = block[: min(64, n - i)]
        return x.requires_grad_(True)

    def grad_of(loss, x):   # autograd.grad: no AccumulateGrad copy of an aliased gradient
        return torch.autograd.grad(loss, x)[0]

    def step_a(x):
        return grad_of(tensor_parallel.vocab_parallel_cross_entropy(x, target).sum(), x)

    def step_b(x, inplace=False):
        lp = vocab_parallel_logprobs(x, target, shard, group, inplace_backward=inplace)
        return grad_of((lp * weights[:, 0]).sum(), x)

    def step_bh(x):
        st = vocab_parallel_token_stats(x, target[:, None], shard, group, entropy=True)
        return grad_of((st.logprobs[:, 0] * weights[:, 0] + st.entropy).sum(), x)

    def step_c(x):
        st = vocab_parallel_token_stats(x, ids, shard, group)
        return grad_of((st.logprobs * weights).sum(), x)

    def step_l(x):
        loss, _ = vocab_parallel_policy_loss(x, rollout, loss_cfg, counts, shard, group, inplace_backward=True)
        return grad_of(loss, x)

    class _Gather(torch.autograd.Function):   # the peers' approach: every rank holds the full vocabulary
        @staticmethod
        def forward(ctx, x):
            out = torch.empty(tp * x.shape[0], x.shape[1], dtype=x.dtype)
            dist.all_gather_into_tensor(out, x.contiguous(), group=group)
            return out.view(tp, *x.shape).permute(1, 0, 2).reshape(x.shape[0], -1)

        @staticmethod
        def backward(ctx, grad):
            return grad[:, rank * shard.width:(rank + 1) * shard.width].clone()

    def step_d(x):
        full = _Gather.apply(x) if tp > 1 else x
        logp = torch.log_softmax(full[:, :vocab].float(), dim=-1)
        return grad_of((logp.gather(1, ids) * weights).sum(), x)

    steps = {"a": step_a, "b": step_b, "b+H": step_bh, "b-ip": lambda x: step_b(x, True), "c": step_c,
             "L": step_l, "d": step_d}
    if "a" in args["methods"]:
        from megatron.core import parallel_state, tensor_parallel
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)

    counter = _Counter(dist)
    res = {m: dict(times=[], peaks=[], bytes=0.0, per_call=0) for m in args["methods"]}
    for rep in range(args["reps"] + 1):          # methods interleaved: a slow spell hits them all alike
        for m in args["methods"]:
            x = fresh()
            dist.barrier(group=group)
            counter.bytes = counter.small = 0
            _reset_peak()
            rss0 = _rss_kb("VmRSS")
            t0 = time.perf_counter()
            grad = steps[m](x)
            dt = time.perf_counter() - t0
            peak = (_rss_kb("VmHWM") - rss0) * 1024
            assert grad.shape == x.shape and grad.dtype == x.dtype
            del x, grad
            if rep:   # rep 0 warms up
                res[m]["times"].append(dt)
                res[m]["peaks"].append(peak)
                res[m]["bytes"], res[m]["per_call"] = counter.bytes / n, counter.small
    q.put((rank, res))
    dist.destroy_process_group()


def run_group(methods, vocab, tokens, dtype, tp, reps):
    """One set of tp processes running `methods` interleaved; returns {method: stats (max over ranks)}."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = dict(methods=methods, vocab=vocab, tokens=tokens, dtype=dtype, reps=reps)
    procs = [ctx.Process(target=_rank, args=(r, tp, port, args, q)) for r in range(tp)]
    for p in procs:
        p.start()
    outs = [q.get(timeout=7200)[1] for _ in procs]
    for p in procs:
        p.join()
    table = {}
    for m in methods:
        times = [max(o[m]["times"][i] for o in outs) for i in range(reps)]   # a step ends with its slowest rank
        table[m] = dict(times=times, peak=max(max(o[m]["peaks"]) for o in outs),
                        bytes_per_token=max(o[m]["bytes"] for o in outs),
                        per_call_bytes=max(o[m]["per_call"] for o in outs))
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936, 128256])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--naive-tokens", type=int, default=1024,
                    help="tokens for (d), run beside its own (a): the full-vocabulary copies of (d) at 4096 "
                         "tokens need ~12 GB per rank, more than a shared 24 GB machine has")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, help="append results here (one JSON object per line)")
    a = ap.parse_args()
    import torch
    from megatron_rl.parallel import vocab_parallel as vp

    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per rank, "
          f"chunk budget {vp.chunk_bytes('cpu') / 2**20:g} MiB, {a.reps} interleaved runs; time = min, t/t(a) = "
          f"min / min of (a), med = median of per-round ratios")
    print(f"{'V':>7} {'dtype':>5} {'tp':>2} {'method':>6} {'N':>5} {'time s':>7} {'t/t(a)':>6} {'med':>5} {'peak MiB':>9} "
          f"{'p/p(a)':>6} {'p-p(a) MiB':>10} {'chunk MiB':>9} {'B/token':>8} {'goal':>5}")
    for vocab in a.vocab:
        for dtype in a.dtype:
            for tp in a.tp:
                width = -(-vocab // (128 * tp)) * (128 * tp) // tp
                chunk = vp._rows(width, None, 1, torch.device('cpu')) * width * 4
                runs = []
                main_methods = [m for m in a.methods if m != "d"]
                if main_methods:
                    runs.append((a.tokens, run_group(["a"] + [m for m in main_methods if m != "a"],
                                                     vocab, a.tokens, dtype, tp, a.reps)))
                if "d" in a.methods:
                    runs.append((a.naive_tokens, run_group(["a", "d"], vocab, a.naive_tokens, dtype, tp, a.reps)))
                for n, table in runs:
                    base = table["a"]
                    for m, r in table.items():
                        if m == "a" and n != a.tokens:
                            continue
                        ratio = min(r["times"]) / min(base["times"])
                        med = statistics.median(t / tb for t, tb in zip(r["times"], base["times"]))
                        t = min(r["times"])
                        goal = {"b": 1.10, "b-ip": 1.10, "L": 1.10, "c": 1.25}.get(m)
                        ok = "-"
                        if goal is not None:
                            mem_ok = m == "c" or r["peak"] <= base["peak"] + chunk
                            ok = "ok" if ratio <= goal and mem_ok else "MISS"
                        pr = f"{r['peak'] / base['peak']:.2f}" if base["peak"] >= 2**20 else "-"
                        print(f"{vocab:>7} {dtype:>5} {tp:>2} {m:>6} {n:>5} {t:7.2f} {ratio:6.2f} {med:5.2f} "
                              f"{r['peak'] / 2**20:9.0f} {pr:>6} "
                              f"{(r['peak'] - base['peak']) / 2**20:10.0f} {chunk / 2**20:9.2f} "
                              f"{r['bytes_per_token']:8.0f} {ok:>5}", flush=True)
                        if a.json:
                            with open(a.json, "a") as f:
                                f.write(json.dumps(dict(method=m, vocab=vocab, tokens=n, dtype=dtype, tp=tp,
                                                        time=t, time_ratio=ratio, time_ratio_median=med, peak=r["peak"],
                                                        peak_a=base["peak"], chunk_bytes=chunk,
                                                        bytes_per_token=r["bytes_per_token"],
                                                        per_call_bytes=r["per_call_bytes"],
                                                        times=r["times"], goal=ok)) + "\n")


if __name__ == "__main__":
    main()
