"""Where the loop's rollouts come from: the engine of each placement, and the one-step off-policy queue.

Placement (rollout.placement):
    colocated       one vLLM engine on the learner's global rank 0, sharing its node
    disaggregated   vLLM engine servers on their own nodes (launch.sh starts them and exports
                    MRL_ENGINE_RENDEZVOUS / MRL_NUM_ENGINES); rank 0 hosts their rendezvous and
                    broadcasts the weights to them (megatron_rl.rollout.remote)

Off-policy lag (rollout.max_off_policy_lag, disaggregated only):
    0   step k's prompts are generated when step k starts, with the weights of after step k-1's update
    1   taking step k's rollout also submits step k+1's prompts, so the engines generate them while
        step k trains: with the weights of before step k's update, one policy step behind. DPPO / CPPO
        anchor the trust region on the rollout policy mu itself, so the stale sampler is what the loss
        measures against: the lag widens nothing the loss does not see (algorithms.md Sec. 1).

The queue keeps the weight version the engines hold (= the policy step they come from) and stamps each
rollout with the version it was generated with; lag = step - version is logged every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


def make_engine(placement: str, engine_config):
    """The engine client of the learner's global rank 0: a local vLLM engine, or the remote engine
    servers (waits for every one of them to register and join the weight group)."""
    if placement == "colocated":
        from megatron_rl.rollout.engine import RolloutEngine

        return RolloutEngine(engine_config)
    from megatron_rl.rollout.remote import RemoteConfig, RemoteEngines

    return RemoteEngines(RemoteConfig.from_env(), engine_config).connect()


def check_placement_env(placement: str) -> None:
    """Every rank, before any engine starts: a disaggregated job without its engines' rendezvous fails
    at once with the variable's name (not rank 0 alone, while the others wait in a collective)."""
    if placement == "disaggregated":
        from megatron_rl.rollout.remote import RemoteConfig

        RemoteConfig.from_env()


@dataclass
class _Pending:
    step: int
    records: list
    version: int
    result: Optional[Callable[[], Any]]    # rank 0: returns the rollout; None on the other ranks


class RolloutQueue:
    """Prompts and rollouts in step order, on every rank (only rank 0 holds an engine; every rank
    draws the same prompts so their data positions stay equal for the checkpoint)."""

    def __init__(self, engine, loader, lag: int, last_step: int, version: int):
        if lag and engine is not None and not hasattr(engine, "submit"):
            raise ValueError("`rollout.max_off_policy_lag` = 1 needs `rollout.placement: disaggregated` "
                             "(a colocated engine cannot generate while the learner trains)")
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
