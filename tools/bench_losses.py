"""Cost per token of each loss mode's mask + loss, relative to `ppo` (CPU). Not a test.

    .venv/bin/python tools/bench_losses.py [--batch 64] [--seq 8192] [--threads 1] [--repeats 15]

Columns: the whole compute_policy_loss forward + backward per mode, and the mask alone (the mode function:
divergence + mask), where the goal is CPPO's mask within 3x of DPPO's (same divergence).
Inputs: padded [batch, seq] responses (random lengths, right padding), top-K = 20, fp32 log-probs; with
--packed the same number of tokens as THD segments of random lengths (a 64-token prompt each, no padding).
The exact-vocabulary modes are left out: they are a test oracle for small vocabularies.
Results are kept in docs/bench_losses.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from megatron_rl.losses import LOSS_MODES, GlobalCounts, LossConfig, PolicyInputs, compute_policy_loss
from megatron_rl.losses.reduce import Batch

MODES = [
    ("ppo", {}), ("dual_clip", {}), ("dppo_binary_tv", {}), ("dppo_binary_kl", {}), ("dppo_topk_tv", {}),
    ("dppo_topk_kl", {}), ("cppo", {"divergence": "binary_tv"}), ("cppo", {"divergence": "binary_tv", "delta_b_mode": "p90"}),
    ("cppo", {"divergence": "topk_tv"}), ("gspo", {}), ("cispo", {"tis_cap": 5.0}), ("pg_is", {}),
]


def make_inputs(b: int, l: int, k: int, gen: torch.Generator, packed: bool = False) -> tuple[dict, GlobalCounts]:
    n = b * l
    if packed:   # THD: random segment lengths covering all n tokens, a 64-token prompt (m = 0) in each
        cuts = torch.randint(1, n, (2 * b - 1,), generator=gen).sort().values
        cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]).unique_consecutive()
        seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff())
        mask = torch.arange(n) - cu[seg] >= 64
        b = cu.numel() - 1
    else:
        lengths = torch.randint(l // 4, l + 1, (b,), generator=gen)
        mask = (torch.arange(l)[None, :] < lengths[:, None]).reshape(-1)
        cu = torch.arange(0, n + 1, l)
    mu_lp = -torch.rand(n, generator=gen) * 3
    pi_lp = (mu_lp + 0.1 * torch.randn(n, generator=gen)).clamp(max=-1e-4)
    topk_mu = -torch.rand(n, k, generator=gen).sort(dim=1).values * 8 - 1.5
    adv = torch.randn(b, generator=gen).repeat_interleave(cu.diff())
    data = dict(logprobs=pi_lp, rollout_logprobs=mu_lp, advantages=adv, loss_mask=mask, cu_seqlens=cu, tokens=torch.randint(0, 150000, (n,), generator=gen),
                topk_ids=torch.randint(0, 150000, (n, k), generator=gen), anchor_topk_logprobs=topk_mu,
                topk_logprobs=topk_mu + 0.05 * torch.randn(n, k, generator=gen))
    return data, GlobalCounts(int(mask.sum()), b, int(cu.diff().max()))


def timeit_all(fns: list, repeats: int) -> list[float]:
    """Minimum CPU time of this thread per function over `repeats` rounds, the functions interleaved
    round-robin so that a change of load on a shared machine hits them all alike. With torch on one
    thread the ops run on the calling thread, so thread CPU time leaves out other processes; the minimum
    is the least disturbed run."""
    for fn in fns:
        fn()                                                # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.thread_time()
            fn()
            best[i] = min(best[i], time.thread_time() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--packed", action="store_true", help="THD segments of random lengths instead of padded rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, counts = make_inputs(args.batch, args.seq, args.topk, torch.Generator().manual_seed(0), args.packed)
    n = args.batch * args.seq
    lp = data.pop("logprobs")

    names, fulls, masks = [], [], []
    for mode, kw in MODES:
        cfg = LossConfig(mode=mode, topk=args.topk, **kw)
        x = lp.clone().requires_grad_()
        inp = PolicyInputs(logprobs=x, **data)
        batch = Batch(cfg.anchor, inp, counts)

        def full(cfg=cfg, inp=inp):
            loss, _ = compute_policy_loss(cfg, inp, counts)
            loss.backward()

        def mask_only(cfg=cfg, batch=batch, mode=mode):
            with torch.no_grad():
                LOSS_MODES[mode](cfg, batch)

        names.append(mode + "".join(f" {v}" for v in kw.values() if isinstance(v, str)))
        fulls.append(full)
        masks.append(mask_only)
    rows = list(zip(names, timeit_all(fulls, args.repeats), timeit_all(masks, args.repeats)))

    base_full = rows[0][1]
    base_mask = rows[0][2]
    dppo_mask = {name: m for name, _, m in rows if name.startswith("dppo_")}
    layout = f"packed THD, {data['cu_seqlens'].numel() - 1} segments" if args.packed else "padded"
    print(f"Run: {args.batch} x {args.seq} = {n} tokens ({layout}), K = {args.topk}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {platform.machine()}, min thread CPU time of {args.repeats} interleaved runs")
    print("| mode | loss fwd+bwd ns/token | x ppo | mask ns/token | mask x ppo | mask x DPPO (same D) |")
    print("|---|---|---|---|---|---|")
    for name, t_full, t_mask in rows:
        ref = None
        if name.startswith("cppo"):
            ref = dppo_mask.get("dppo_" + name.split()[1])
        rel = f"{t_mask / ref:.2f}" if ref else ""
        print(f"| {name} | {t_full / n * 1e9:.1f} | {t_full / base_full:.2f} | {t_mask / n * 1e9:.1f} | "
              f"{t_mask / base_mask:.2f} | {rel} |")


if __name__ == "__main__":
    main()
