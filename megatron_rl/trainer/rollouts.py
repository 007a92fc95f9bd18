"""The rollout side of the loop: the prompts, the engine(s), the one-step off-policy queue and the reward.

`Rollouts` is what trainer/loop.py talks to for everything that is not the learner. Every rank holds one
(every rank draws the same prompts, so their data positions stay equal for the checkpoint); only global
rank 0 holds the engine client, and the methods that need it return None on the other ranks.

Placement (rollout.placement):
    colocated       one vLLM engine on the learner's global rank 0, sharing its node
    disaggregated   vLLM engine servers on their own nodes (launch.sh starts them and exports
                    MRL_ENGINE_RENDEZVOUS / MRL_NUM_ENGINES); rank 0 hosts their rendezvous and
                    broadcasts the weights to them (megatron_rl.rollout.remote)

Off-policy lag (rollout.max_off_policy_lag, disaggregated only; RolloutSection refuses it colocated):
    0   step k's prompts are generated when step k starts, with the weights of after step k-1's update
    1   taking step k's rollout also submits step k+1's prompts, so the engines generate them while
        step k trains: with the weights of before step k's update, one policy step behind. DPPO / CPPO
        anchor the trust region on the rollout policy mu itself, so the stale sampler is what the loss
        measures against: the lag widens nothing the loss does not see (algorithms.md Sec. 1).

The queue keeps the weight version the engines hold (= the policy step they come from) and stamps each
rollout with the version it was generated with; lag = step - version is logged every step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_rl.rewards.base import SafeReward
from megatron_rl.trainer.advantages import compute_advantages
from megatron_rl.trainer.data import PromptDataset, PromptLoader

log = logging.getLogger(__name__)

if TYPE_CHECKING:   # annotations only: config.py imports this module for check_placement_env
    from megatron_rl.trainer.config import RLConfig


def make_engine(placement: str, engine_config):
    """The engine client of the learner's global rank 0: a local vLLM engine, or the remote engine
    servers (waits for every one of them to register and join the weight group)."""
    if placement == "colocated":
        from megatron_rl.rollout.engine import RolloutEngine

        return RolloutEngine(engine_config)
    from megatron_rl.rollout.remote import RemoteConfig, RemoteEngines

    return RemoteEngines(RemoteConfig.from_env(), engine_config).connect()


def engine_config(cfg: "RLConfig", hf_dir: Path):
    """The engines' EngineConfig, from the rollout section: the one place it is built."""
    from megatron_rl.rollout.engine import EngineConfig

    r = cfg.rollout
    return EngineConfig(model=str(hf_dir), dtype=r.dtype, temperature=r.temperature, n_samples=r.n_samples,
                        max_response_tokens=r.max_response_length,
                        max_model_len=r.max_prompt_length + r.max_response_length, logprobs_topk=cfg.logprobs_topk,
                        seed=r.seed, enforce_eager=r.enforce_eager, tensor_parallel_size=r.engine_tensor_parallel,
                        gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=r.sleep_during_training,
                        kv_cache_memory_bytes=r.kv_cache_memory_mb << 20 if r.kv_cache_memory_mb else None)


def check_placement_env(placement: str) -> None:
    """Every rank, before any engine starts (RLConfig.check_startup): a disaggregated job without its
    engines' rendezvous fails at once with the variable's name (not rank 0 alone, while the others wait in
    a collective)."""
    if placement == "disaggregated":
        from megatron_rl.rollout.remote import RemoteConfig

        RemoteConfig.from_env()


@dataclass
class StepRollout:
    """One step's rollout as the loop carries it from phase to phase."""
    step: int
    records: list               # the step's prompts (every rank)
    rollout: Any                # the engines' Rollout (rank 0; None elsewhere); score() sets its rewards
    data_state: dict            # the loader's position after this step's prompts (the checkpoint's)
    metrics: dict = field(default_factory=dict)   # the step's metrics so far; every phase adds its own


class Rollouts:
    """The prompts (data, rollout.max_prompt_length), the reward, the advantages, and on global rank 0 the
    engine(s) of rollout.placement, holding the weights of policy step `version` (the resumed step)."""

    def __init__(self, cfg: "RLConfig", hf_dir: Path, data_state: Optional[dict] = None, version: int = 0):
        from transformers import AutoTokenizer

        self.cfg, self.advantage = cfg.rollout, cfg.advantage
        self.records_path = Path(cfg.run_dir) / "rollouts.jsonl"
        self.dataset = PromptDataset(cfg.data, AutoTokenizer.from_pretrained(str(hf_dir)),
                                     max_prompt_tokens=cfg.rollout.max_prompt_length)
        self.loader = PromptLoader(self.dataset, cfg.train.prompts_per_step)
        if data_state is not None:   # resuming: the position after the checkpointed step's prompts
            self.loader.load_state_dict(data_state)
        self.reward = SafeReward.from_spec(cfg.reward.fn, timeout_s=cfg.reward.timeout_s,
                                           step_timeout_s=cfg.reward.step_timeout_s)
        self._data_epoch: Optional[int] = None   # the last epoch whose data stats were logged
        self.engine = make_engine(self.cfg.placement, engine_config(cfg, hf_dir)) if dist.get_rank() == 0 else None
        self.queue = RolloutQueue(self.engine, self.loader, self.cfg.max_off_policy_lag, cfg.train.steps, version)

    # ---- a step ------------------------------------------------------------------------------------------
    def take(self, step: int) -> StepRollout:
        """Step `step`'s rollout (RolloutQueue.take); the lag metrics start the step's metrics."""
        records, rollout, data_state, metrics = self.queue.take(step)
        metrics.update(self._data_stats(data_state["epoch"]))
        return StepRollout(step, records, rollout, data_state, metrics)

    def score(self, batch: StepRollout) -> Optional[tuple[Any, torch.Tensor]]:
        """Rank 0: rewards (a failing verifier scores 0 and is counted), advantages (dropping constant
        groups if configured), the metrics of both, and the step's line in run_dir/rollouts.jsonl.
        Returns (the kept part of the rollout, its advantages); None on the other ranks."""
        rollout = batch.rollout
        if rollout is None:
            return None
        errors_before, timeouts_before, t0 = self.reward.errors, self.reward.timeouts, time.monotonic()
        # one batch: one round trip to the reward worker, within reward.step_timeout_s
        rollout.set_rewards(self.reward.score([s.response_text for s in rollout.samples],
                                              [s.info.get("answer") for s in rollout.samples]))
        reward_seconds = time.monotonic() - t0
        rewards = rollout.rewards
        adv = compute_advantages(rewards, rollout.group_ids, self.advantage)
        batch.metrics.update(rollout.stats)
        batch.metrics.update(adv.metrics())
        batch.metrics.update({"reward/mean": float(rewards.mean()), "reward/max": float(rewards.max()),
                              "reward/errors": self.reward.errors - errors_before,
                              "reward/timeouts": self.reward.timeouts - timeouts_before,
                              "reward/seconds": reward_seconds})
        self._record(batch)
        return rollout.select(adv.keep), adv.advantages[adv.keep]

    def _data_stats(self, epoch: int) -> dict:
        """The prompts skipped at load, once per epoch (the first step of each, and the first after a
        resume): a skipped over-long prompt is skipped again every epoch, so it is reported as often."""
        if epoch == self._data_epoch:
            return {}
        self._data_epoch = epoch
        stats = self.dataset.stats
        if stats["too_long_skipped"] and (not dist.is_initialized() or dist.get_rank() == 0):
            log.warning("data epoch %d: %s", epoch, self.dataset.too_long_message())
        return {"data/epoch": epoch, "data/too_long_skipped": stats["too_long_skipped"],
                "data/bad_records_skipped": stats["bad_records_skipped"]}

    def _record(self, batch: StepRollout, examples: int = 4) -> None:
        """run_dir/rollouts.jsonl: which prompts each step used, their rewards, and a few responses."""
        records, samples = batch.records, batch.rollout.samples
        row = {"step": batch.step, "prompt_indices": [r.index for r in records],
               "rewards": [s.reward for s in samples],
               "examples": [{"prompt": records[s.group_id].prompt_text, "response": s.response_text,
                             "answer": s.info.get("answer"), "reward": s.reward} for s in samples[:examples]]}
        with open(self.records_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # ---- the engines' weights ------------------------------------------------------------------------------
    def update_weights(self, weights: Iterator[tuple[str, torch.Tensor]], version: int) -> dict:
        """Load the learner's weights (policy step `version`; every rank drives the stream, see _consume)
        into the engines in buckets of rollout.weight_sync_bucket_mb. Remote engines first finish the
        generation in flight (lag 1: the next step's, with the old weights). Sync metrics on rank 0."""
        bucket = self.cfg.weight_sync_bucket_mb << 20
        # remote engines stamp their rollouts with the version they hold; the local engine has no versions
        versioned = {"version": version} if self.cfg.placement == "disaggregated" else {}

        def load(stream):
            return self.engine.update_weights(stream, max_bucket_bytes=bucket, **versioned).as_metrics()

        out = self._consume(weights, load) or {}
        self.queue.weights_updated(version)
        return out

    def verify_weights(self, weights: Iterator[tuple[str, torch.Tensor]]):
        """The engines' weights read back against the stream (a rollout.weight_sync.WeightCheck, naming
        the tensor that differs); rank 0, None elsewhere."""
        return self._consume(weights, lambda w: self.engine.verify_weights(w))

    def probe(self, prompts: list, max_tokens: int) -> Optional[list]:
        """The engines' seeded probe responses with mu's log-probs (one Rollout per engine); rank 0."""
        return self.engine.probe(prompts, max_tokens) if self.engine is not None else None

    def _consume(self, stream: Iterator, consume: Callable[[Iterator], Any]) -> Any:
        """Rank 0 hands the stream to `consume`; the other ranks run it to the end for its collectives."""
        if self.engine is not None:
            return consume(stream)
        for _ in stream:
            pass
        return None

    # ---- engine memory and lifetime --------------------------------------------------------------------------
    @property
    def _sleeps(self) -> bool:
        # GPU, colocated: the engine hands its memory to the learner while it trains (no-op on CPU)
        return self.engine is not None and self.cfg.placement == "colocated" and self.cfg.sleep_during_training

    def sleep(self) -> None:
        if self._sleeps:
            self.engine.sleep()

    def wake_up(self) -> None:
        """Before the weights are updated (they must be resident) and before shutting down."""
        if self._sleeps:
            self.engine.wake_up()

    def shutdown(self, stopped: bool = False) -> None:
        """stopped: the job stops on request; remote servers then get a short timeout, since with lag 1
        they may be generating a step nobody waits for (they exit on disconnect). The local engine's
        shutdown takes no timeout."""
        self.reward.close()   # the reward worker process, on every rank (only rank 0 started one)
        if self.engine is None:
            return
        remote = self.cfg.placement == "disaggregated"
        self.engine.shutdown(**({"timeout_s": 5.0} if stopped and remote else {}))


@dataclass
class _Pending:
    step: int
    records: list
    version: int
    result: Optional[Callable[[], Any]]    # rank 0: returns the rollout; None on the other ranks


class RolloutQueue:
    """Prompts and rollouts in step order, on every rank (only rank 0 holds an engine; every rank
    draws the same prompts so their data positions stay equal for the checkpoint). With lag 1 the
    engine must be able to `submit` (the remote engines); RolloutSection allows lag 1 only then."""

    def __init__(self, engine, loader, lag: int, last_step: int, version: int):
        self.engine, self.loader, self.lag, self.last_step = engine, loader, lag, last_step
        self.version = version         # the policy step the engines' weights come from
        self._next: Optional[_Pending] = None

    def take(self, step: int) -> tuple[list, Any, dict, dict]:
        """(prompt records, rollout (None off rank 0), data position after this step's prompts, metrics).

        The data position is taken before the next step's prompts are drawn: a checkpoint at the end of
        this step resumes with step k+1's prompts, which are then generated again (with lag 0 for that
        first step, since the resumed engines hold the checkpoint's weights)."""
        pending = self._next if self._next is not None else self._submit(step)
        if pending.step != step:
            raise RuntimeError(f"rollout queue: asked for step {step}, holds step {pending.step}")
        data_state = self.loader.state_dict()
        self._next = self._submit(step + 1) if self.lag and step + 1 < self.last_step else None
        rollout = pending.result() if pending.result is not None else None
        stamped = getattr(rollout, "weight_version", pending.version)
        if stamped != pending.version:
            raise RuntimeError(f"rollout of step {step}: engines generated with weight version {stamped}, "
                               f"expected {pending.version}")
        metrics = {"rollout/weight_version": pending.version, "rollout/off_policy_lag": step - pending.version}
        return pending.records, rollout, data_state, metrics

    def _submit(self, step: int) -> _Pending:
        records = self.loader.next_batch()
        result = None
        if self.engine is not None:
            args = ([r.prompt_ids for r in records],)
            kw = dict(prompt_indices=[r.index for r in records], step=step,
                      infos=[{"answer": r.answer} for r in records])
            if self.lag:
                result = self.engine.submit(*args, **kw).result    # generating from now on
            else:
                result = lambda: self.engine.generate(*args, **kw)  # noqa: E731  (generated when taken)
        return _Pending(step, records, self.version, result)

    def weights_updated(self, version: int) -> None:
        self.version = version
