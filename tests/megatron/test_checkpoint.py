"""Checkpoint resume is bit-exact, saves are atomic, and damaged checkpoints are refused.

Layout TP1 x PP2 x DP2 (4 ranks) with bf16 (Float16Module), the distributed optimizer and clipping:
pipeline stages, optimizer-state sharding over DP, fp32 main params and Adam's step all round-trip.

Launch 1: K steps, save, N more steps (the uninterrupted run, its final state written to disk), then a
second save killed (os._exit on every rank) at the commit point: a crash mid-save.
Launch 2 (fresh processes): the newest checkpoint found is step K (the crashed save left only a temp
dir); a truncated copy, a corrupted copy and a copy without its marker are each refused with
CheckpointError; then step K loads and N more steps equal the uninterrupted run exactly (torch.equal
on every parameter, fp32 main param, Adam moment and step; same losses, same RNG draws).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.multirank import MultiRankError, run_ranks

from .common import MAX_RESPONSE, make_samples, model_cfg

K, N = 2, 2
LAYOUT = (1, 2)   # TP, PP; DP = 2 on 4 ranks


def _actor():
    from megatron_rl.losses.config import LossConfig
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.policy import policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig
    from megatron_rl.megatron.training import OptimConfig, build_training

    cfg = model_cfg()
    ps = initialize_parallel(tp=LAYOUT[0], pp=LAYOUT[1], model_cfg=cfg)
    chunks, opt = build_training(cfg, ps, OptimConfig(lr=1e-3, clip_grad=0.5, bf16=True),
                                 init=lambda m: init_params_(m, cfg, ps, seed=2))
    loss = policy_loss_fn(cfg, ps, LossConfig(mode="cppo", horizon="sequence"))
    return Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=96, num_microbatches=2,
                                                  max_response_length=MAX_RESPONSE), loss)


def _batch(step, ps):
    from megatron_rl.megatron.step import shard_for_dp
    return shard_for_dp(make_samples(n=8, seed=100 + step), 1, ps.dp, ps.dp_rank)


def _state(actor) -> dict:
    """Everything that must round-trip: model params, optimizer state (main params, moments, step), RNG."""
    from megatron_rl.megatron.training import unwrap

    out = {f"param/{n}": p.detach().clone() for n, p in unwrap(actor.chunks[0]).named_parameters()}
    inner = actor.optimizer.optimizer
    for gi, group in enumerate(inner.param_groups):
        for pi, p in enumerate(group["params"]):
            out[f"main/{gi}/{pi}"] = p.detach().clone()
            for k, v in inner.state[p].items():
                out[f"opt/{gi}/{pi}/{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
    out["rng_draw"] = torch.rand(4)   # the CPU generator continues identically
    return out


def _train(actor, first, last, losses):
    for step in range(first, last):
        losses.append(actor.train_on_rollout(_batch(step, actor.ps))[0]["loss"])


def uninterrupted(rank, world, root):
    from megatron_rl.megatron import checkpoint

    actor = _actor()
    losses = []
    _train(actor, 0, K, losses)
    checkpoint.save_checkpoint(root, actor)
    _train(actor, K, K + N, losses)
    torch.save((_state(actor), losses, actor.iteration), Path(root) / f"reference_rank{rank}.pt")

    def crash(tmp, final):   # die at the commit point, after every file (and the marker) is written
        os._exit(17)
    checkpoint._commit = crash
    checkpoint.save_checkpoint(root, actor)


def resumed(rank, world, root):
    from megatron_rl.megatron import checkpoint

    root = Path(root)
    actor = _actor()
    latest = checkpoint.latest_checkpoint(root)
    torch.distributed.barrier()   # every rank has looked before rank 0 adds the damaged copies
    refusals = {}
    if rank == 0:
        for kind in ("truncated", "corrupted", "unmarked"):
            bad = root / f"iter_{9000 + len(refusals):07d}"
            shutil.copytree(latest, bad)
            target = max((p for p in bad.rglob("*") if p.is_file() and p.name != checkpoint.MARKER),
                         key=lambda p: p.stat().st_size)
            if kind == "truncated":
                with open(target, "r+b") as f:
                    f.truncate(target.stat().st_size // 2)
            elif kind == "corrupted":
                data = bytearray(target.read_bytes())
                data[len(data) // 2] ^= 0xFF
                target.write_bytes(bytes(data))
            else:
                (bad / checkpoint.MARKER).unlink()
            refusals[kind] = bad
    box = [refusals]
    torch.distributed.broadcast_object_list(box, src=0)
    errors = {}
    for kind, bad in box[0].items():
        try:
            checkpoint.load_checkpoint(bad, actor)
            errors[kind] = None
        except checkpoint.CheckpointError as e:
            errors[kind] = str(e)
    manifest = checkpoint.load_checkpoint(latest, actor)
    losses = []
    _train(actor, K, K + N, losses)
    ref_state, ref_losses, ref_iter = torch.load(root / f"reference_rank{rank}.pt", weights_only=False)
    state = _state(actor)
    mismatched = sorted(k for k in ref_state if k not in state or not torch.equal(ref_state[k], state[k]))
    return dict(latest=latest.name, manifest_iter=manifest["iteration"], errors=errors, losses=losses,
                ref_losses=ref_losses[K:], iteration=actor.iteration, ref_iteration=ref_iter,
                mismatched=mismatched, compared=len(ref_state))


def test_resume_is_bit_exact_and_damaged_checkpoints_are_refused(tmp_path):
    root = str(tmp_path / "ckpt")
    with pytest.raises(MultiRankError, match="exit code 17"):
        run_ranks(uninterrupted, 4, args=(root,), timeout=300)
    leftovers = sorted(p.name for p in Path(root).iterdir())
    assert f"iter_{K:07d}" in leftovers and f".iter_{K + N:07d}.tmp" in leftovers
    assert f"iter_{K + N:07d}" not in leftovers          # the crashed save never became a checkpoint

    results = run_ranks(resumed, 4, args=(root,), timeout=300)
    for r in results:
        assert r["latest"] == f"iter_{K:07d}" and r["manifest_iter"] == K
        assert "truncated" in r["errors"]["truncated"] or "bytes" in r["errors"]["truncated"]
        assert "checksum mismatch" in r["errors"]["corrupted"]
        assert "incomplete" in r["errors"]["unmarked"] and "COMPLETE.json" in r["errors"]["unmarked"]
        assert r["iteration"] == r["ref_iteration"] == K + N
        assert r["compared"] > 20 and r["mismatched"] == [], r["mismatched"][:10]
        assert r["losses"] == r["ref_losses"]
