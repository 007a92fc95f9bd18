"""GPU benchmark of the vocabulary pass: ours vs megatron-core's vocab_parallel_cross_entropy, one device, tp 1.

    python tools/bench_gpu.py --out gpu_out/bench_gpu.md          # N = 16384, V = 151936, bf16 and fp32, CUDA
    python tools/bench_gpu.py --device cpu --tokens 256 --vocab 4096 --iters 2 --out /tmp/bench.md   # smoke test

Methods, each forward + backward (torch.autograd.grad w.r.t. the logits) of a scalar of the outputs:
  (a)    megatron-core `tensor_parallel.vocab_parallel_cross_entropy` on its tp-1 group (the baseline)
  (b)    ours, binary DPPO / CPPO path: log p(target)           vocab_parallel_logprobs
  (b-ip) (b) with inplace_backward=True: the gradient overwrites the logits, as (a) does
  (c)    ours, top-K path: log p at 20 ids + the target, and the entropy, in one pass   token_stats
  (L)    the Megatron step's whole binary loss: vocab_parallel_policy_loss(dppo_binary_tv) with
         inplace_backward=True, group None, as megatron_rl.megatron.policy.policy_loss_fn calls it at tp 1
(b) and (c) run under the default chunk policy (chunk_rows=None: vocab_parallel.chunk_bytes(device) of
fp32 work buffers) and under fixed budgets (--budgets, MiB: chunk_rows = budget / (4 W)), so the policy
can be checked against its neighbours.

Method: per dtype, one master copy of the logits [N, V] (random, scale 2); before every run the logits are
refreshed from it (megatron-core and the in-place methods overwrite them; not timed). Time: CUDA events
around forward + backward (perf_counter on the CPU), --warmup runs dropped, median (and min) of --iters.
Peak: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was allocated before
the forward (the logits, the master copy): everything the step allocates, the returned gradient
included ('-' on the CPU). A correctness line per dtype compares (b) with -(a): values and gradients.
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402

K = 20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron(device: torch.device):
    """A one-rank world and megatron-core's parallel state at tp 1 (as tools/bench_vocab_parallel.py does),
    with megatron_rl's GPU backend: NCCL for CUDA tensors, gloo for CPU ones. Returns tensor_parallel, or
    None (with the reason) when megatron-core cannot be imported: the baseline is then left out."""
    import torch.distributed as dist

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # megatron-core's "no transformer-engine / apex" notices
            from megatron.core import parallel_state, tensor_parallel
    except Exception as e:  # noqa: BLE001 - any import failure means: no baseline
        return None, f"megatron-core unavailable ({type(e).__name__}: {e})"
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    return tensor_parallel, None


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.t0, self.t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.p0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.t1.record()
            torch.cuda.synchronize()
            self.ms = self.t0.elapsed_time(self.t1)
        else:
            self.ms = (time.perf_counter() - self.p0) * 1e3


def bench_dtype(args, device, dtype_name, tensor_parallel, out_rows, failures):
    from megatron_rl.losses import GlobalCounts, LossConfig
    from megatron_rl.parallel import (VocabShard, vocab_parallel_logprobs, vocab_parallel_policy_loss,
                                      vocab_parallel_token_stats)
    from megatron_rl.parallel import vocab_parallel as vp

    dtype, n, vocab = DTYPES[dtype_name], args.tokens, args.vocab
    width = -(-vocab // 128) * 128                  # Megatron's padding at tp 1
    shard = VocabShard(0, width, vocab)
    elem = torch.finfo(dtype).bits // 8
    cuda = device.type == "cuda"
    if cuda:   # master + working logits, megatron's fp32 copy and the gradient(s): ~ 2 x + 2 x fp32
        need = n * width * (2 * elem + 8) + 2**30
        free = torch.cuda.mem_get_info()[0]
        if free < need:
            print(f"skipping {dtype_name}: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free", flush=True)
            return None
    g = torch.Generator(device=device).manual_seed(1234)
    master = (torch.randn(n, width, generator=g, device=device) * 2).to(dtype)
    x = master.clone().requires_grad_(True)
    target = torch.randint(0, vocab, (n,), generator=g, device=device)
    ids = torch.cat([target[:, None], torch.randint(0, vocab, (n, K), generator=g, device=device)], dim=1)
    weights = torch.randn(n, K + 1, generator=g, device=device)
    rollout = dict(tokens=target, rollout_logprobs=-5 * torch.rand(n, generator=g, device=device) - 0.1,
                   advantages=weights[:, 0].clone(), loss_mask=torch.ones(n, dtype=torch.bool, device=device))
    loss_cfg = LossConfig(mode="dppo_binary_tv", loss_agg_mode="token-mean")
    counts = GlobalCounts(num_tokens=n, num_sequences=1)

    def grad_of(loss):   # autograd.grad: no AccumulateGrad copy of an aliased gradient
        return torch.autograd.grad(loss, x)[0]

    steps = {
        "a": lambda cr: grad_of(tensor_parallel.vocab_parallel_cross_entropy(x, target).sum()),
        "b": lambda cr: grad_of((vocab_parallel_logprobs(x, target, shard, None, chunk_rows=cr) * weights[:, 0]).sum()),
        "b-ip": lambda cr: grad_of((vocab_parallel_logprobs(x, target, shard, None, chunk_rows=cr,
                                                            inplace_backward=True) * weights[:, 0]).sum()),
        "c": lambda cr: grad_of(_topk_loss(vocab_parallel_token_stats(x, ids, shard, None, entropy=True,
                                                                      chunk_rows=cr), weights)),
        "L": lambda cr: grad_of(vocab_parallel_policy_loss(x, rollout, loss_cfg, counts, shard, None,
                                                           chunk_rows=cr, inplace_backward=True)[0]),
    }
    budget_default = vp.chunk_bytes(device)
    policies = [("default", None)] + [(f"{b:g} MiB", max(1, int(b * 2**20) // (4 * width))) for b in args.budgets]
    plan = []
    for m in args.methods:
        if m == "a":            # megatron-core has no chunking
            plan += [("a", "-", None)] if tensor_parallel is not None else []
        elif m in ("b", "c"):   # the two paths whose chunk policy is under test
            plan += [(m, label, cr) for label, cr in policies]
        else:
            plan.append((m, "default", None))

    def refresh():
        with torch.no_grad():
            x.copy_(master)

    check = _correctness(refresh, x, target, tensor_parallel, vocab == width)
    results = []
    for m, label, cr in plan:
        times, peaks = [], []
        try:
            for rep in range(args.warmup + args.iters):
                refresh()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                with Timer(device) as t:
                    grad = steps[m](cr)
                if cuda:
                    peaks.append(torch.cuda.max_memory_allocated() - before)
                assert grad.shape == x.shape and grad.dtype == x.dtype
                del grad
                if rep >= args.warmup:
                    times.append(t.ms)
        except Exception as e:  # noqa: BLE001 - one failing method (e.g. out of memory) must not end the run
            print(f"  {dtype_name} {m:>4} {label:>9}: FAILED {type(e).__name__}: {e}", flush=True)
            failures.append(f"{dtype_name} {m} {label}: {type(e).__name__}: {str(e)[:200]}")
            grad = None
            if cuda:
                torch.cuda.empty_cache()
            continue
        buffers = 2 if m == "c" else 1
        total = cr if cr is not None else max(1, budget_default // (4 * width))
        rows = None if m == "a" else min(n, max(1, total // buffers))     # the pass never uses more than N
        results.append(dict(dtype=dtype_name, method=m, policy=label, rows=rows, median_ms=statistics.median(times),
                            min_ms=min(times), peak=max(peaks) if peaks else None, times=times))
        print(f"  {dtype_name} {m:>4} {label:>9}: {statistics.median(times):9.2f} ms"
              + (f", peak {max(peaks) / 2**20:8.0f} MiB" if peaks else ""), flush=True)
    base = next((r for r in results if r["method"] == "a"), None)
    for r in results:
        r["t_ratio"] = r["median_ms"] / base["median_ms"] if base else None
        r["p_minus_a"] = (r["peak"] - base["peak"]) if base and r["peak"] is not None else None
        out_rows.append(r)
    del master, x
    if cuda:
        torch.cuda.empty_cache()
    return check


def _topk_loss(st, weights):
    return (st.logprobs * weights).sum() + st.entropy.sum()


def _correctness(refresh, x, target, tensor_parallel, comparable):
    """(b)'s log p and gradient vs megatron-core's -(loss) and gradient, on the same logits (only without
    padding columns: megatron-core gives padding probability, we do not)."""
    if tensor_parallel is None or not comparable:
        return "correctness vs megatron-core: not compared (" + ("no megatron-core" if tensor_parallel is None
                                                                  else "padded vocabulary") + ")"
    from megatron_rl.parallel import VocabShard, vocab_parallel_logprobs

    refresh()
    shard = VocabShard(0, x.shape[1], x.shape[1])
    lp = vocab_parallel_logprobs(x, target, shard, None)
    (g_ours,) = torch.autograd.grad(-lp.sum(), x)
    lp = lp.detach()
    refresh()
    ce = tensor_parallel.vocab_parallel_cross_entropy(x, target)
    (g_mc,) = torch.autograd.grad(ce.sum(), x)
    with torch.no_grad():
        d_val = float((lp + ce).abs().max())
        d_grad = float((g_ours.float() - g_mc.float()).abs().max())
    return f"correctness vs megatron-core: max |log p + CE| = {d_val:.2e}, max |grad diff| = {d_grad:.2e}"


def markdown(rows, header, checks) -> str:
    lines = [header, ""] + [f"- {c}" for c in checks] + [""]
    lines.append("| dtype | method | chunk policy | rows / buffer | median ms | min ms | t / t(a) | peak MiB | "
                 "peak - peak(a) MiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)   # noqa: E731
        lines.append(f"| {r['dtype']} | {r['method']} | {r['policy']} | {f(r['rows'], 'd')} | {r['median_ms']:.2f} | "
                     f"{r['min_ms']:.2f} | {f(r['t_ratio'], '.2f')} | "
                     f"{f(None if r['peak'] is None else r['peak'] / 2**20, '.0f')} | "
                     f"{f(None if r['p_minus_a'] is None else r['p_minus_a'] / 2**20, '.0f')} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--methods", nargs="+", default=["a", "b", "b-ip", "c", "L"], choices=["a", "b", "b-ip", "c", "L"])
    ap.add_argument("--budgets", type=float, nargs="*", default=[16, 64, 256, 1024],
                    help="fixed chunk budgets for (b) and (c), MiB of fp32 work buffers")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_gpu: --device cuda but torch.cuda.is_available() is False (use --device cpu)")
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    from megatron_rl.parallel import vocab_parallel as vp

    tensor_parallel, why = init_megatron(device)
    what = (torch.cuda.get_device_name(device) + f", CUDA {torch.version.cuda}" if device.type == "cuda"
            else f"{platform.machine()} CPU, {os.cpu_count()} cores")
    mc = "-"
    if tensor_parallel is not None:
        import megatron.core
        mc = getattr(megatron.core, "__version__", "?")
    header = (f"# bench_gpu: {what}, torch {torch.__version__}, megatron-core {mc}; N = {a.tokens}, V = {a.vocab}, "
              f"K = {K} + 1; default chunk budget {vp.chunk_bytes(device) / 2**20:g} MiB; {a.warmup} warm-up + "
              f"{a.iters} timed runs, median")
    print(header, flush=True)
    checks = [why] if why else []
    rows, failures = [], []
    def write():   # after every dtype: a run cut short by its time limit still leaves its table
        table = markdown(rows, header, checks + [f"FAILED {f}" for f in failures])
        for path, text in ((a.out, table), (a.json, json.dumps(rows, indent=1))):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        return table

    for dt in a.dtype:
        c = bench_dtype(a, device, dt, tensor_parallel, rows, failures)
        if c:
            checks.append(f"{dt}: {c}")
        write()
    print(write(), flush=True)
    if tensor_parallel is not None:
        import torch.distributed as dist
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
