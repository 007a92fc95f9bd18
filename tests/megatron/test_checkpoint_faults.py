"""Checkpoint faults: disk full mid-save, a damaged newest checkpoint (checkpoint.on_damaged), and a
crafted checkpoint whose state files carry pickle payloads (nothing of it runs, the load is refused).

One 2-rank launch (TP1 x PP1 x DP2, distributed optimizer) runs every case in order; bit-exact resume
itself is tests/megatron/test_checkpoint.py's.
"""

from __future__ import annotations

from .common import MAX_RESPONSE, make_samples, model_cfg


def _actor():
    from megatron_rl.losses.config import LossConfig
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.policy import policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig
    from megatron_rl.megatron.training import OptimConfig, build_training

    cfg = model_cfg()
    ps = initialize_parallel(tp=1, pp=1, model_cfg=cfg)
    chunks, opt = build_training(cfg, ps, OptimConfig(lr=1e-3, clip_grad=0.5),
                                 init=lambda m: init_params_(m, cfg, ps, seed=3))
    loss = policy_loss_fn(cfg, ps, LossConfig(mode="cppo", horizon="sequence"))
    return Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=96, num_microbatches=1,
                                                  max_response_length=MAX_RESPONSE), loss)


def _train(actor, first, last):
    from megatron_rl.megatron.step import shard_for_dp
    for step in range(first, last):
        actor.train_on_rollout(shard_for_dp(make_samples(n=4, seed=200 + step), 1, actor.ps.dp, actor.ps.dp_rank))


class _Payload:
    """A pickle that, when unpickled, writes a marker file: what a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal(ckpt, rel):
    """Rewrite the manifest's checksum of `rel`, as an attacker can: the checksums guard against damage only."""
    import json

    from megatron_rl.megatron import checkpoint
    manifest = json.loads((ckpt / checkpoint.MARKER).read_text())
    f = ckpt / rel
    manifest["files"][rel] = {"sha256": checkpoint._sha256(f), "size": f.stat().st_size}
    (ckpt / checkpoint.MARKER).write_text(json.dumps(manifest))


def _disk_full_writer(rank_to_fail, error):
    """torch's per-item writer (run in megatron's forked writer processes) writes half of one item on
    `rank_to_fail`, then raises what a full disk raises."""
    import functools

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real = filesystem_async._write_item

    @functools.wraps(real)   # megatron inspects its signature
    def write(*args, **kwargs):
        if dist.get_rank() == rank_to_fail:
            stream = next(a for a in args if hasattr(a, "write"))
            stream.write(b"\0" * 512)
            raise error
        return real(*args, **kwargs)
    return real, write


def faults(rank, world, root, marker):
    import errno
    import shutil
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_rl.megatron import checkpoint

    root, out = Path(root), {}
    actor = _actor()
    _train(actor, 0, 1)
    first = checkpoint.save_checkpoint(root, actor)                    # iter_0000001: the one to keep
    ref = {n: p.detach().clone() for n, p in actor.chunks[0].named_parameters()}
    _train(actor, 1, 2)

    # 4. disk full: a write failing on one rank (the real error forms), and the free-space pre-check
    errors = {"enospc": OSError(errno.ENOSPC, "No space left on device"),
              "torch": RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1408")}
    for kind, error in errors.items():
        real, fake = _disk_full_writer(0, error)   # rank 0 writes the items (DP replicas: dp0)
        filesystem_async._write_item = fake
        try:
            checkpoint.save_checkpoint(root, actor)
            out[kind] = None
        except checkpoint.CheckpointError as e:
            out[kind] = str(e)
        finally:
            filesystem_async._write_item = real
        dist.barrier()
        out[f"{kind}_left"] = sorted(p.name for p in root.iterdir())
    real_usage = shutil.disk_usage
    shutil.disk_usage = lambda p: real_usage(p)._replace(free=1000)
    try:
        checkpoint.save_checkpoint(root, actor)
        out["precheck"] = None
    except checkpoint.CheckpointError as e:
        out["precheck"] = str(e)
    finally:
        shutil.disk_usage = real_usage
    out["precheck_left"] = sorted(p.name for p in root.iterdir())
    second = checkpoint.save_checkpoint(root, actor)                    # the disk has room again
    dist.barrier()

    # 5. a damaged newest checkpoint: refused with the hint under "error", skipped under "previous"
    if rank == 0:
        target = second / "__0_0.distcp"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    dist.barrier()
    try:
        checkpoint.load_newest(root, actor, "error")
        out["error"] = None
    except checkpoint.CheckpointError as e:
        out["error"] = str(e)
    path, manifest, skipped = checkpoint.load_newest(root, actor, "previous")
    out["previous"] = (path.name, manifest["iteration"], [(p.name, why) for p, why in skipped])
    out["restored"] = all(torch.equal(ref[n], p) for n, p in actor.chunks[0].named_parameters())
    dist.barrier()

    # 8. crafted pickles in the state files (checksums resealed): nothing runs, the load is refused
    import pickle
    for kind, rel in (("rng", "rng/rank0.json"), ("metadata", ".metadata"), ("common", "common.pt")):
        bad = root / f"iter_{9000 + len(out):07d}"
        if rank == 0:
            shutil.copytree(first, bad)
            if kind == "common":
                torch.save({"x": _Payload(marker)}, bad / rel)
            else:
                (bad / rel).write_bytes(pickle.dumps(_Payload(marker)))
            _reseal(bad, rel)
        dist.barrier()
        try:
            checkpoint.load_checkpoint(bad, actor)
            out[f"crafted_{kind}"] = None
        except checkpoint.CheckpointError as e:
            out[f"crafted_{kind}"] = str(e)
        out[f"crafted_{kind}_ran"] = Path(marker).exists()
    return out


def test_disk_full_damaged_newest_and_crafted_pickles(tmp_path):
    from tests.multirank import run_ranks

    root, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    results = run_ranks(faults, 2, args=(str(root), str(marker)), timeout=400)
    for r in results:
        for kind in ("enospc", "torch", "precheck"):
            msg = r[kind]
            assert msg and f"no space left on device under {root} (needs ~" in msg and " GB" in msg, (kind, msg)
            # the temp dir is gone on every rank, the older checkpoint stays
            assert r[f"{kind}_left"] == ["iter_0000001"], (kind, r[f"{kind}_left"])
        assert "checksum mismatch" in r["error"] and "checkpoint.on_damaged=previous" in r["error"], r["error"]
        name, iteration, skipped = r["previous"]
        assert (name, iteration) == ("iter_0000001", 1)
        assert [s[0] for s in skipped] == ["iter_0000002"] and "checksum mismatch" in skipped[0][1]
        assert r["restored"]
        assert "rank0.json is not a valid RNG state file" in r["crafted_rng"], r["crafted_rng"]
        assert "unsafe or unreadable .metadata" in r["crafted_metadata"], r["crafted_metadata"]
        assert "common.pt does not load with weights_only=True" in r["crafted_common"], r["crafted_common"]
        assert not any(r[f"crafted_{k}_ran"] for k in ("rng", "metadata", "common"))
    assert not marker.exists()
