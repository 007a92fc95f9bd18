"""The RLVR actor-learner loop: vLLM generates, Megatron learns with DPPO / CPPO.

One step (every rank runs this function; rank 0 holds the engine client, see rollouts.py):

    generate   the engines sample n responses per prompt with mu's log-probs (and top-K when the loss needs
               it); with rollout.max_off_policy_lag = 1 they generated step k+1 while step k trained
    reward     rank 0 scores them (a failing verifier scores 0 and is counted) and computes advantages
    train      every rank takes its DP share; `minibatches` optimizer steps; anchor = mu (or pi_old)
    sync       the learner's weights stream to the engine(s) in HF layout, bounded buckets (colocated: into
               the local engine; disaggregated: a broadcast to every engine server)
    log        metrics of algorithms.md Sec. 7 to JSONL / TensorBoard / W&B; checkpoint every N steps

Resume: the newest complete checkpoint under run_dir/checkpoints (model, optimizer, RNG, counters, data
position) is loaded and the engines re-synced, so a restarted run continues with the same data order.
A stop request (the file run_dir/STOP, or SIGUSR1) checkpoints after the current step's training (its sync is
skipped: the resumed run syncs the checkpoint's weights) and exits.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rl.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_rl.megatron.hf_checkpoint import export_hf, hf_to_megatron
from megatron_rl.megatron.model import resolve_use_te
from megatron_rl.rewards.base import SafeReward
from megatron_rl.rollout.engine import EngineConfig
from megatron_rl.rollout.mismatch import PROBE_TOLERANCE, logprob_mismatch
from megatron_rl.trainer.advantages import AdvantageConfig, compute_advantages
from megatron_rl.trainer.config import RLConfig, load_rl_config
from megatron_rl.trainer.data import DataConfig, PromptDataset, PromptLoader
from megatron_rl.trainer.learner import (Learner, broadcast_object, build_learner, hf_weights, init_world,
                                         policy_logprobs, probe_engines, rollout_to_samples)
from megatron_rl.trainer.rollouts import RolloutQueue, check_placement_env, make_engine
from megatron_rl.utils.config import to_dict
from megatron_rl.utils.tracking import PhaseTimer, Tracker

log = logging.getLogger("megatron_rl")


def train(cfg: RLConfig) -> list[dict]:
    rank, world = init_world()
    cfg.check_hardware(use_te=resolve_use_te(None))        # before the conversion writes anything
    check_placement_env(cfg.rollout.placement)
    run_dir = Path(cfg.run_dir)
    stop = StopRequest(run_dir)
    base_ckpt, hf_dir = prepare_model(cfg, run_dir)
    learner = build_learner(cfg, base_ckpt)
    tokenizer = _tokenizer(hf_dir)
    loader = PromptLoader(PromptDataset(_data_config(cfg), tokenizer), cfg.train.prompts_per_step)
    start = resume(cfg, learner, loader, run_dir / "checkpoints")
    engine = make_engine(cfg.rollout.placement, _engine_config(cfg, hf_dir)) if rank == 0 else None
    queue = RolloutQueue(engine, loader, cfg.rollout.max_off_policy_lag, cfg.train.steps, version=0)
    tracker = Tracker(run_dir, cfg.train.steps, **_tracking(cfg)) if rank == 0 else None
    reward_fn = SafeReward.from_spec(cfg.reward.fn)
    colocated = cfg.rollout.placement == "colocated"
    colocated_sleep = engine is not None and colocated and cfg.rollout.sleep_during_training
    probe = WeightProbe.from_config(cfg, loader.dataset)
    if start > 0:   # the engines started from the base weights
        sync(learner, engine, queue, version=start, check=probe if cfg.rollout.weight_check != "never" else None)

    last = start - 1
    for step in range(start, cfg.train.steps):
        last, timer, metrics = step, PhaseTimer(), {}
        with timer("generate", tracker, step):   # lag 1: only the wait for a rollout submitted last step
            records, rollout, data_state, lag_metrics = queue.take(step)
            metrics.update(lag_metrics)
        with timer("reward", tracker, step):
            samples = score(cfg, rollout, reward_fn, metrics) if rank == 0 else None
            samples = broadcast_object(samples, src=0)
            if rank == 0:
                record_rollout(run_dir, step, records, rollout)
        with timer("train", tracker, step):
            if colocated_sleep:
                engine.sleep()      # GPU: hand the engine's memory to the learner (no-op on CPU)
            metrics.update(learn(cfg, learner, samples, first_step=step == start))
        # asked before the sync: a stopping job skips it (the resumed one syncs the checkpoint's weights),
        # which with lag 1 would first wait for the next step's generation
        stopping = stop.requested()   # collective: every rank agrees
        with timer("sync", tracker, step):
            if colocated_sleep:
                engine.wake_up()    # weights must be resident before they are updated (and shut down)
            if not stopping:
                metrics.update(sync(learner, engine, queue, version=step + 1,
                                    check=probe if _verify(cfg, step, start) else None))
        if _checkpoint_due(cfg, step) or stopping:
            checkpoint(cfg, learner, data_state, step + 1, run_dir / "checkpoints")
        if tracker:
            metrics.update(timer.metrics())
            metrics["throughput/tokens_per_second"] = metrics.get("rollout/response_tokens", 0) / max(
                metrics["time/step"], 1e-9)
            tracker.log(step, metrics)
        if stopping:
            if rank == 0:
                print(f"stopped on request ({stop.reason}) after step {step}: checkpoint saved; the next "
                      "start resumes from it", flush=True)
            break

    history = tracker.history if tracker else []
    if cfg.checkpoint.export_hf and last + 1 == cfg.train.steps:    # the run is complete
        export(learner, run_dir / "hf_final", hf_dir)
    if tracker:
        tracker.plot()
        tracker.close()
    if engine:
        # stopping with lag 1: do not wait for the prefetched generation (servers exit on disconnect)
        engine.shutdown(**({"timeout_s": 5.0} if stop.reason and not colocated else {}))
    stop.close()
    return history


def _checkpoint_due(cfg: RLConfig, step: int) -> bool:
    every = cfg.checkpoint.every
    return bool(every and (step + 1) % every == 0) or step + 1 == cfg.train.steps


def _verify(cfg: RLConfig, step: int, start: int) -> bool:
    """Check the engines after this step's sync (WeightProbe)? `first_last`: the first sync of this
    process (a resumed one's start-up sync) and the run's last."""
    when = cfg.rollout.weight_check
    return when == "every" or (when == "first_last" and (step == start == 0 or step == cfg.train.steps - 1))


class StopRequest:
    """A request to checkpoint and exit after the current step's training: the file run_dir/STOP (launch.sh
    writes it when SLURM warns of the time limit, before it requeues the job) or SIGUSR1 to any rank.
    `requested()` is a collective (one tiny all-reduce), so every rank stops after the same step."""

    def __init__(self, run_dir: Path):
        import signal

        import psutil

        self.path, self.reason, self._signalled = run_dir / "STOP", "", False
        # left by the run this one resumes: older than this process (one written since is a live request)
        if dist.get_rank() == 0 and self.path.exists() and \
                self.path.stat().st_mtime < psutil.Process().create_time():
            self.path.unlink()
        dist.barrier()
        self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

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

    def close(self) -> None:
        import signal

        signal.signal(signal.SIGUSR1, self._previous)
        if self.reason and dist.get_rank() == 0 and self.path.exists():
            self.path.unlink()


# ---- phases ------------------------------------------------------------------------------------------------

def score(cfg: RLConfig, rollout, reward_fn: SafeReward, metrics: dict) -> list[dict]:
    """Rewards, advantages (dropping constant groups if configured), and the per-token training samples."""
    errors_before = reward_fn.errors
    rollout.set_rewards([reward_fn(s.response_text, s.info.get("answer")) for s in rollout.samples])
    rewards = rollout.rewards
    adv = compute_advantages(rewards, rollout.group_ids, AdvantageConfig(
        estimator=cfg.advantage.estimator, std_normalize=cfg.advantage.std_normalize,
        drop_uniform_groups=cfg.advantage.drop_uniform_groups))
    metrics.update(rollout.stats)
    metrics.update(adv.metrics())
    metrics.update({"reward/mean": float(rewards.mean()), "reward/max": float(rewards.max()),
                    "reward/errors": reward_fn.errors - errors_before})
    kept = rollout.select(adv.keep)
    samples = rollout_to_samples(kept, adv.advantages[adv.keep], rollout.topk)
    # every DP rank and minibatch needs an equal share: trim to a multiple (logged, rarely non-zero)
    unit = cfg.train.minibatches * _dp_size(cfg)
    trimmed = len(samples) - len(samples) // unit * unit
    metrics["train/samples_trimmed"] = trimmed
    return samples[: len(samples) - trimmed]


def record_rollout(run_dir: Path, step: int, records, rollout, examples: int = 4) -> None:
    """run_dir/rollouts.jsonl: which prompts each step used, their rewards, and a few responses."""
    row = {"step": step, "prompt_indices": [r.index for r in records],
           "rewards": [s.reward for s in rollout.samples],
           "examples": [{"prompt": records[s.group_id].prompt_text, "response": s.response_text,
                         "answer": s.info.get("answer"), "reward": s.reward} for s in rollout.samples[:examples]]}
    with open(run_dir / "rollouts.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def learn(cfg: RLConfig, learner: Learner, samples: list[dict], first_step: bool) -> dict:
    """`minibatches` optimizer steps on this rank's share; the anchor stays fixed across them."""
    from megatron_rl.megatron.step import shard_for_dp

    ps = learner.ps
    if not samples:
        return {"train/skipped": 1}
    local = shard_for_dp(samples, cfg.train.minibatches, ps.dp, ps.dp_rank)
    out = {}
    if first_step or cfg.loss.anchor == "old":   # one recompute pass: pi at the rollout's parameters
        pi = policy_logprobs(learner, local)
        if pi is not None:
            if cfg.loss.anchor == "old":
                for s, lp in zip(local, pi):
                    s["old_logprobs"] = lp
            out.update(_mismatch(local, pi, ps))
    if learner.reference is not None:   # loss.kl_coef > 0: log-probs of the frozen initial policy
        ref = policy_logprobs(learner, local, reference=True)
        for s, lp in zip(local, ref or []):
            s["ref_logprobs"] = lp
    reports = learner.actor.train_on_rollout(local)
    if ps.is_last_stage:
        for key in reports[0]:
            values = [r[key] for r in reports if isinstance(r.get(key), (int, float))]
            if values:
                out[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
    return broadcast_object(out, src=learner.log_rank)


@dataclass
class WeightProbe:
    """What a weight-sync check runs: the behavioural probe (the first `prompts` of the data set, a
    seeded response of `max_tokens` each) and, with `readback`, the parameter read-back."""
    prompts: list
    max_tokens: int
    tolerance: float
    readback: bool

    @classmethod
    def from_config(cls, cfg: RLConfig, dataset) -> "WeightProbe":
        r = cfg.rollout
        tolerance = r.probe_tolerance
        if tolerance is None:   # the coarser of the engine's and the learner's precision decides
            tolerance = max(PROBE_TOLERANCE[r.dtype], PROBE_TOLERANCE[cfg.model.dtype])
        prompts = [dataset[i].prompt_ids for i in range(min(r.probe_prompts, len(dataset)))]
        return cls(prompts, min(r.probe_tokens, r.max_response_length), tolerance, r.weight_readback)


def sync(learner: Learner, engine, queue: RolloutQueue, version: int, check: Optional[WeightProbe]) -> dict:
    """Stream the learner's weights (policy step `version`) to the engines, then, given a `check`, make
    sure the engines score tokens as the learner does. Every rank drives the weight stream and the
    probe's forward (both collective); only rank 0 holds the engines. Remote engines first finish the
    generation in flight (lag 1: the next step's, with the old weights)."""
    bucket = learner.cfg.rollout.weight_sync_bucket_mb << 20
    # remote engines stamp their rollouts with the version they hold; the local engine has no versions
    versioned = {"version": version} if learner.cfg.rollout.placement == "disaggregated" else {}
    out = _drive(hf_weights(learner), lambda w: engine.update_weights(w, max_bucket_bytes=bucket,
                                                                      **versioned).as_metrics(), engine) or {}
    queue.weights_updated(version)
    if check is None:
        return out
    t0 = time.perf_counter()
    if check.readback:   # names the tensor that differs
        readback = _drive(hf_weights(learner), engine.verify_weights if engine else None, engine)
        if readback is not None:
            if not readback.ok:
                raise RuntimeError(f"weight sync check failed after the update to step {version}: "
                                   f"{readback.summary()}")
            out["weight_sync/max_abs_diff"] = readback.max_abs_diff
            out["weight_sync/readback_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = probe_engines(learner, engine, check.prompts, check.max_tokens, check.tolerance)
    if not probe.ok:
        raise RuntimeError(f"weight sync probe failed after the update to step {version}: the engine does not "
                           f"score tokens as the learner does ({probe.summary()}); the rollouts would come from "
                           "a policy the learner never trained. A tolerance too tight for the dtypes is set by "
                           "rollout.probe_tolerance")
    out.update({"weight_sync/probe_logprob_diff_max": probe.max_abs_diff, "weight_sync/checked": 1,
                "weight_sync/probe_seconds": time.perf_counter() - t0})
    return out


def _drive(stream, consume, engine):
    """Rank 0 hands the stream to `consume`; the other ranks run it to the end for its collectives."""
    if engine is not None:
        return consume(stream)
    for _ in stream:
        pass
    return None


def checkpoint(cfg: RLConfig, learner: Learner, data_state: dict, step: int, root: Path) -> None:
    """`data_state`: the prompt loader's position after step - 1's prompts (not the prefetched ones)."""
    save_checkpoint(root, learner.actor, extra={"trainer_step": step, "data": data_state,
                                                "config": to_dict(cfg)})
    if dist.get_rank() == 0:   # keep the newest `keep` complete checkpoints
        done = sorted(p for p in root.glob("iter_*") if p.is_dir())
        for old in done[: -cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def resume(cfg: RLConfig, learner: Learner, loader: PromptLoader, root: Path) -> int:
    path = latest_checkpoint(root) if cfg.checkpoint.resume else None
    if path is None:
        return 0
    state = load_checkpoint(path, learner.actor)
    extra = state.get("extra", {})
    loader.load_state_dict(extra["data"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} at step {extra['trainer_step']}", flush=True)
    return int(extra["trainer_step"])


def export(learner: Learner, out_dir: Path, hf_dir: Path) -> None:
    """The final policy as an HF checkpoint (streamed per stage; tokenizer files from the base model)."""
    from megatron_rl.megatron.training import unwrap

    source = json.loads((hf_dir / "config.json").read_text())
    export_hf(unwrap(learner.actor.chunks[0]), learner.model_cfg, learner.ps, out_dir, hf_dir, source,
              overwrite=True)


# ---- set-up helpers ------------------------------------------------------------------------------------------

def prepare_model(cfg: RLConfig, run_dir: Path) -> tuple[Path, Path]:
    """(Megatron checkpoint to start from, HF dir the engine and tokenizer load). An HF model is converted
    once into run_dir/base at the configured layout."""
    if cfg.model.checkpoint:
        ckpt = Path(cfg.model.checkpoint)
        return ckpt, Path(cfg.model.hf_path) if cfg.model.hf_path else ckpt / "hf"
    ckpt = run_dir / "base"
    if not (ckpt / "megatron_rl_model.json").exists():
        p = cfg.parallel
        hf_to_megatron(cfg.model.hf_path, ckpt, tp=p.tensor, pp=p.pipeline, overwrite=True)
    return ckpt, Path(cfg.model.hf_path)


def _tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def _data_config(cfg: RLConfig) -> DataConfig:
    d = cfg.data
    return DataConfig(path=d.train_path, prompt_key=d.prompt_key, answer_key=d.answer_key,
                      on_bad_line=d.on_bad_line, max_prompt_tokens=cfg.rollout.max_prompt_length,
                      system_prompt=d.system_prompt, shuffle=d.shuffle, seed=d.seed)


def _engine_config(cfg: RLConfig, hf_dir: Path) -> EngineConfig:
    r = cfg.rollout
    return EngineConfig(model=str(hf_dir), dtype=r.dtype, temperature=r.temperature, n_samples=r.n_samples,
                        max_response_tokens=r.max_response_length,
                        max_model_len=r.max_prompt_length + r.max_response_length, logprobs_topk=cfg.logprobs_topk,
                        seed=r.seed, enforce_eager=r.enforce_eager, tensor_parallel_size=r.engine_tensor_parallel,
                        gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=r.sleep_during_training,
                        kv_cache_memory_bytes=r.kv_cache_memory_mb << 20 if r.kv_cache_memory_mb else None)


def _tracking(cfg: RLConfig) -> dict:
    g = cfg.logging
    return dict(jsonl=g.jsonl, tensorboard=g.tensorboard, wandb=g.wandb, wandb_project=g.wandb_project,
                progress=g.progress, config=to_dict(cfg))


def _dp_size(cfg: RLConfig) -> int:
    p = cfg.parallel
    return dist.get_world_size() // (p.tensor * p.pipeline * p.context)


def _mismatch(samples: list[dict], pi: list[torch.Tensor], ps) -> dict:
    """|pi_a - mu_a| on sampled response tokens (algorithms.md Sec. 7), reduced over the DP ranks."""
    mask = torch.cat([s["loss_mask"] for s in samples]) != 0
    m = logprob_mismatch(torch.cat(pi), torch.cat([s["rollout_logprobs"] for s in samples]), mask)
    # host scalars (floats already): reduced over the DP group's gloo side
    sums = torch.tensor([m["prob_diff_sum"], float(m["num_tokens"])], dtype=torch.float64, device="cpu")
    maxes = torch.tensor([m["prob_diff_max"], m["logprob_diff_max"]], dtype=torch.float64, device="cpu")
    if ps.dp > 1:
        dist.all_reduce(sums, group=ps.dp_group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=ps.dp_group)
    return {"mismatch/prob_diff_mean": float(sums[0] / sums[1].clamp(min=1)),
            "mismatch/prob_diff_max": float(maxes[0]), "mismatch/logprob_diff_max": float(maxes[1])}


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
