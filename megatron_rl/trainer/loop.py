"""The RLVR actor-learner loop: vLLM generates, Megatron learns with DPPO / CPPO.

`train()` is verbs on two objects: the `Learner` (trainer/learner.py, the one door to Megatron) and the
`Rollouts` (trainer/rollouts.py: prompts, reward, engines, queue). Every rank runs it; global rank 0 holds
the engine client. Before anything is converted, started or loaded, `RLConfig.check_startup` checks the
whole config against the model's config file, the world size, the machine, the data file and the reward.

One step:

    generate   the engines sample n responses per prompt with mu's log-probs (and top-K when the loss needs
               it); with rollout.max_off_policy_lag = 1 they generated step k+1 while step k trains
    reward     rank 0 scores them (a failing verifier scores 0 and is counted) and computes advantages;
               every rank receives the training samples
    train      every rank takes its DP share; `minibatches` optimizer steps; anchor = mu (or pi_old)
    sync       the learner's weights stream to the engine(s) in HF layout, bounded buckets (colocated: into
               the local engine; disaggregated: a broadcast to every engine server), then, when due
               (rollout.weight_check), the weight check (WeightProbe)
    log        metrics of algorithms.md Sec. 7 to JSONL / TensorBoard / W&B; checkpoint every N steps

Resume: the newest complete checkpoint under run_dir/checkpoints (model, optimizer, RNG, counters, data
position) is loaded and the engines re-synced, so a restarted run continues with the same data order.
A stop request (the file run_dir/STOP, or SIGUSR1) checkpoints after the current step's training (its sync is
skipped: the resumed run syncs the checkpoint's weights) and exits.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rl.rollout.mismatch import PROBE_TOLERANCE
from megatron_rl.trainer.config import RLConfig, load_rl_config
from megatron_rl.trainer.learner import Learner, init_world
from megatron_rl.trainer.rollouts import Rollouts
from megatron_rl.utils.config import to_dict
from megatron_rl.utils.tracking import PhaseTimer, Tracker

log = logging.getLogger("megatron_rl")


def train(cfg: RLConfig) -> list[dict]:
    rank, world = init_world()
    cfg.check_startup(world)     # every config error, before anything is converted, started or loaded
    stop = StopRequest(Path(cfg.run_dir))
    learner = Learner.build(cfg)                         # the base model converted once, then built
    data_state = learner.resume()                        # the newest checkpoint, if any (learner.step)
    start = learner.step
    rollouts = Rollouts(cfg, learner.hf_dir, data_state, version=start)   # prompts, reward, engines
    tracker = Tracker(cfg.run_dir, cfg.train.steps, cfg.logging, to_dict(cfg), active=rank == 0)
    probe = WeightProbe.from_config(cfg, rollouts.dataset, start)
    # a request that came during start-up (build, resume, engine start: minutes) is honoured now, not after a
    # whole step: nothing has trained since the resumed checkpoint, so there is nothing to save or sync
    stopped_at_start = stop.requested()
    if stopped_at_start:
        stop.announce(None)
    elif start > 0:   # the engines started from the base weights
        sync(learner, rollouts, probe)

    for step in range(start, start if stopped_at_start else cfg.train.steps):
        timer = PhaseTimer()
        with timer("generate", tracker, step):   # lag 1: only the wait for a rollout submitted last step
            batch = rollouts.take(step)
        with timer("reward", tracker, step):
            samples = learner.samples(rollouts.score(batch), batch.metrics)
        with timer("train", tracker, step):
            rollouts.sleep()        # GPU: hand the engine's memory to the learner (no-op on CPU)
            batch.metrics.update(learner.train(samples))
        # asked before the sync: a stopping job skips it (the resumed one syncs the checkpoint's weights),
        # which with lag 1 would first wait for the next step's generation
        stopping = stop.requested()   # collective: every rank agrees
        with timer("sync", tracker, step):
            rollouts.wake_up()      # weights must be resident before they are updated (and shut down)
            if not stopping:
                batch.metrics.update(sync(learner, rollouts, probe))
        if stopping or _checkpoint_due(cfg, learner.step):
            learner.save(batch.data_state)
        tracker.log(step, batch.metrics, timer)
        if stopping:
            stop.announce(step)
            break

    if cfg.checkpoint.export_hf and learner.step == cfg.train.steps:    # the run is complete
        learner.export()
    tracker.close()
    rollouts.shutdown(stopped=bool(stop.reason))
    stop.close()
    return tracker.history


def _checkpoint_due(cfg: RLConfig, step: int) -> bool:
    """After RL step `step` (1-based: the learner's step once it trained): every checkpoint.every, and
    the last."""
    every = cfg.checkpoint.every
    return bool(every and step % every == 0) or step == cfg.train.steps


class StopRequest:
    """A request to checkpoint and exit after the current step's training: the file run_dir/STOP (launch.sh
    writes it when SLURM warns of the time limit, before it requeues the job) or SIGUSR1 to any rank.
    `requested()` is a collective (one tiny all-reduce), so every rank stops after the same step."""

    def __init__(self, run_dir: Path):
        import os
        import signal

        import psutil

        self.path, self.reason, self._signalled = run_dir / "STOP", "", False
        # first: a signal from now on counts (launch.sh runs the ranks with SIGUSR1 ignored until here, and
        # writes STOP for one that came earlier)
        self._previous = signal.signal(signal.SIGUSR1, self._on_signal)
        # left by the run this one resumes: older than this process, or than the launcher's start of this step
        # (MRL_STOP_SINCE, epoch seconds: a STOP written while torchrun was starting the ranks is live)
        since = psutil.Process().create_time()
        if os.environ.get("MRL_STOP_SINCE", "").isdigit():
            since = min(since, float(os.environ["MRL_STOP_SINCE"]))
        if dist.get_rank() == 0 and self.path.exists() and self.path.stat().st_mtime < since:
            self.path.unlink()
        dist.barrier()

    def _on_signal(self, *_):
        self._signalled = True

    def requested(self) -> bool:
        # host flags: the default group is cpu:gloo,cuda:nccl on GPU, so a CPU tensor reduces over gloo
        flags = torch.tensor([float(self._signalled), float(dist.get_rank() == 0 and self.path.exists())],
                             device="cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags.any():
            self.reason = "SIGUSR1" if flags[0] else f"file {self.path}"
        return bool(flags.any())

    def announce(self, step) -> None:
        """`step` None: the request came during start-up, before any step (the state is the resumed one's)."""
        if dist.get_rank() == 0 and step is None:
            print(f"stopped on request ({self.reason}) during start-up, before the first step: nothing new to "
                  "save; the next start resumes from the newest checkpoint", flush=True)
        elif dist.get_rank() == 0:
            print(f"stopped on request ({self.reason}) after step {step}: checkpoint saved; the next "
                  "start resumes from it", flush=True)

    def close(self) -> None:
        import signal

        signal.signal(signal.SIGUSR1, self._previous)
        if self.reason and dist.get_rank() == 0 and self.path.exists():
            self.path.unlink()


# ---- the weight sync and its check ---------------------------------------------------------------------------

@dataclass
class WeightProbe:
    """What a weight-sync check runs and when: the behavioural probe (the first `prompts` of the data set,
    a seeded response of `max_tokens` each) and, with `readback`, the parameter read-back; `when` is
    rollout.weight_check, `first` the version of this process's first sync, `last` the run's last."""
    prompts: list
    max_tokens: int
    tolerance: float
    readback: bool
    when: str = "every"
    first: int = 0
    last: int = 0

    @classmethod
    def from_config(cls, cfg: RLConfig, dataset, start: int) -> "WeightProbe":
        r = cfg.rollout
        tolerance = r.probe_tolerance
        if tolerance is None:   # the coarser of the engine's and the learner's precision decides
            tolerance = max(PROBE_TOLERANCE[r.dtype], PROBE_TOLERANCE[cfg.model.dtype])
        prompts = [dataset[i].prompt_ids for i in range(min(r.probe_prompts, len(dataset)))]
        # a resumed process syncs first at start-up (version start), a fresh one after step 0 (version 1)
        return cls(prompts, min(r.probe_tokens, r.max_response_length), tolerance, r.weight_readback,
                   r.weight_check, first=start or 1, last=cfg.train.steps)

    def due(self, version: int) -> bool:
        """Check the engines after the sync to `version`? first_last: this process's first sync and the
        run's last."""
        return self.when == "every" or (self.when == "first_last" and version in (self.first, self.last))


def sync(learner: Learner, rollouts: Rollouts, probe: WeightProbe) -> dict:
    """Stream the learner's weights (policy step learner.step) to the engines, then, when the probe is
    due, make sure the engines score tokens as the learner does. Every rank drives the weight stream and
    the probe's forward (both collective); only rank 0 holds the engines."""
    version = learner.step
    out = rollouts.update_weights(learner.hf_weights(), version)
    if not probe.due(version):
        return out
    t0 = time.perf_counter()
    if probe.readback:   # names the tensor that differs
        readback = rollouts.verify_weights(learner.hf_weights())
        if readback is not None:
            if not readback.ok:
                raise RuntimeError(f"weight sync check failed after the update to step {version}: "
                                   f"{readback.summary()}")
            out["weight_sync/max_abs_diff"] = readback.max_abs_diff
            out["weight_sync/readback_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    check = learner.check_probe(rollouts.probe(probe.prompts, probe.max_tokens), probe.tolerance)
    if not check.ok:
        raise RuntimeError(f"weight sync probe failed after the update to step {version}: the engine does not "
                           f"score tokens as the learner does ({check.summary()}); the rollouts would come from "
                           "a policy the learner never trained. A tolerance too tight for the dtypes is set by "
                           "rollout.probe_tolerance")
    out.update({"weight_sync/probe_logprob_diff_max": check.max_abs_diff, "weight_sync/checked": 1,
                "weight_sync/probe_seconds": time.perf_counter() - t0})
    return out


# ---- entry points ------------------------------------------------------------------------------------------

def run(config_path, overrides=()) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_rl_config(config_path, list(overrides))
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def run_demo(config_path, overrides=()) -> int:
    """The embedded default: prepare the tiny task + policy offline, RL on it, report before / after."""
    from megatron_rl.trainer.demo import DemoSpec, prepare_demo

    cfg = load_rl_config(config_path, list(overrides))
    t0 = time.time()
    info = prepare_demo(Path(cfg.run_dir) / "demo", DemoSpec(seed=cfg.train.seed))
    cfg.model.hf_path, cfg.data.train_path = info["hf_path"], info["train_path"]
    try:
        history = train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if history:
        k = max(1, len(history) // 5)
        before = sum(r["reward/mean"] for r in history[:k]) / k
        after = sum(r["reward/mean"] for r in history[-k:]) / k
        summary = {"reward_first_steps": before, "reward_last_steps": after, "steps": len(history),
                   "seconds": round(time.time() - t0, 1), "plot": str(Path(cfg.run_dir) / "summary.png")}
        (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"demo done in {summary['seconds']}s: mean reward over the first {k} steps {before:.3f} -> "
              f"last {k} steps {after:.3f}; plot: {summary['plot']}", flush=True)
    return 0
