"""Run by test_families.py in its own process (megatron-core and vLLM keep process-global state): the
real learner and a real engine, one rank. The weight check must catch a bucket corrupted on its way to
the engine, with the probe alone (read-back off) and with the read-back (which names the tensor)."""

import sys
from pathlib import Path

import torch

from megatron_rl.rollout.weight_sync import DEFAULT_BUCKET_BYTES
from megatron_rl.trainer.config import load_rl_config
from megatron_rl.trainer.data import PromptDataset
from megatron_rl.trainer.learner import build_learner, init_world
from megatron_rl.trainer.loop import WeightProbe, _data_config, _engine_config, _tokenizer, prepare_model, sync
from megatron_rl.trainer.rollouts import RolloutQueue, make_engine


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
    init_world()
    cfg = load_rl_config(config, list(overrides))
    base, hf_dir = prepare_model(cfg, Path(cfg.run_dir))
    learner = build_learner(cfg, base)
    dataset = PromptDataset(_data_config(cfg), _tokenizer(hf_dir))
    engine = make_engine("colocated", _engine_config(cfg, hf_dir))
    queue = RolloutQueue(engine, None, 0, 1, 0)
    probe = WeightProbe.from_config(cfg, dataset)
    out = sync(learner, engine, queue, version=1, check=probe)
    print("clean sync:", out, flush=True)
    assert out["weight_sync/probe_logprob_diff_max"] <= probe.tolerance and out["weight_sync/max_abs_diff"] == 0
    name = "model.layers.1.mlp.down_proj.weight"
    bad = CorruptingEngine(engine, name)
    expect_failure(lambda: sync(learner, bad, queue, version=7, check=WeightProbe(**{**vars(probe), "readback": False})),
                   "weight sync probe failed after the update to step 7", "token id", "probe sequence")
    expect_failure(lambda: sync(learner, bad, queue, version=8, check=probe),
                   "weight sync check failed after the update to step 8", name)
    assert sync(learner, engine, queue, version=9, check=probe)["weight_sync/checked"] == 1   # repaired
    engine.shutdown()
    torch.distributed.destroy_process_group()
    print("probe job ok", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
