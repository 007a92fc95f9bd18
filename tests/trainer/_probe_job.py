"""Run by test_families.py in its own process (megatron-core and vLLM keep process-global state): the
real learner and a real engine, one rank. The weight check must catch a bucket corrupted on its way to
the engine, with the probe alone (read-back off) and with the read-back (which names the tensor)."""

import dataclasses
import sys

import torch

from megatron_rl.rollout.weight_sync import DEFAULT_BUCKET_BYTES
from megatron_rl.trainer.config import load_rl_config
from megatron_rl.trainer.learner import Learner, init_world
from megatron_rl.trainer.loop import WeightProbe, sync
from megatron_rl.trainer.rollouts import Rollouts


class CorruptingEngine:
    """The real engine, except that one tensor is scaled on its way in (a corrupted bucket)."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def update_weights(self, named_tensors, max_bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        stream = ((n, t * 1.5 if n == self.name else t) for n, t in named_tensors)
        return self.engine.update_weights(stream, max_bucket_bytes=max_bucket_bytes)

    def __getattr__(self, attr):
        return getattr(self.engine, attr)


def expect_failure(fn, *needles):
    try:
        fn()
    except RuntimeError as e:
        missing = [n for n in needles if n not in str(e)]
        assert not missing, f"{missing} not in: {e}"
        print("refused:", e, flush=True)
        return
    raise AssertionError(f"no failure; expected one naming {needles}")


def main(config: str, *overrides: str) -> None:
    _, world = init_world()
    cfg = load_rl_config(config, list(overrides))
    cfg.check_startup(world)
    learner = Learner.build(cfg)
    rollouts = Rollouts(cfg, learner.hf_dir)     # the colocated engine of the config
    engine = rollouts.engine
    # checked after every sync; learner.step is the version each sync names
    probe = dataclasses.replace(WeightProbe.from_config(cfg, rollouts.dataset, start=0), when="every")

    def sync_as(version, engine_in_use, check):
        learner.step, rollouts.engine = version, engine_in_use
        return sync(learner, rollouts, check)

    out = sync_as(1, engine, probe)
    print("clean sync:", out, flush=True)
    assert out["weight_sync/probe_logprob_diff_max"] <= probe.tolerance and out["weight_sync/max_abs_diff"] == 0
    name = "model.layers.1.mlp.down_proj.weight"
    bad = CorruptingEngine(engine, name)
    expect_failure(lambda: sync_as(7, bad, dataclasses.replace(probe, readback=False)),
                   "weight sync probe failed after the update to step 7", "token id", "probe sequence")
    expect_failure(lambda: sync_as(8, bad, probe),
                   "weight sync check failed after the update to step 8", name)
    assert sync_as(9, engine, probe)["weight_sync/checked"] == 1   # repaired
    rollouts.shutdown()
    torch.distributed.destroy_process_group()
    print("probe job ok", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
