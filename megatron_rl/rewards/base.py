"""Reward functions by name or import path, and the wrapper that keeps a bad one from stopping a run."""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from megatron_rl.rewards.exact import exact_match_reward
from megatron_rl.rewards.math_answer import boxed_format_reward, math_reward

log = logging.getLogger(__name__)

RewardFn = Callable[[str, Any], float]

BUILTIN_REWARDS: Mapping[str, RewardFn] = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "boxed_format": boxed_format_reward,
}


def load_reward_fn(path: str) -> RewardFn:
    """Import a user reward function from "package.module:function"."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {path!r}: an import path must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({e})") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {attr!r} is not callable")
    return fn


def resolve_reward(spec: str, extra: Optional[Mapping[str, RewardFn]] = None) -> RewardFn:
    """A built-in name ("math", "exact_match", "boxed_format"), a name in `extra`, or an import path."""
    table = {**BUILTIN_REWARDS, **(extra or {})}
    if spec in table:
        return table[spec]
    if ":" in spec:
        return load_reward_fn(spec)
    raise ValueError(f"reward {spec!r} is not a known name ({', '.join(sorted(table))}) nor an import path "
                     "'package.module:function'")


class SafeReward:
    """Calls a reward function; an exception or a non-finite / non-numeric result gives `error_value`
    for that sample and is counted (`metrics()`), and the run goes on."""

    def __init__(self, fn: RewardFn, name: Optional[str] = None, error_value: float = 0.0,
                 log_first: int = 3):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")
        self.error_value = float(error_value)
        self.log_first = log_first
        self.calls = 0
        self.errors = 0

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> "SafeReward":
        return cls(resolve_reward(spec), name=spec, **kwargs)

    def __call__(self, response: str, answer: Any) -> float:
        self.calls += 1
        try:
            value = float(self.fn(response, answer))
            if not math.isfinite(value):
                raise ValueError(f"returned {value}")
        except Exception as e:   # a broken verifier costs one sample's reward, never the run
            self.errors += 1
            if self.errors <= self.log_first:
                log.warning("reward %s failed on a sample (scored %s): %s: %s", self.name, self.error_value,
                            type(e).__name__, e)
            return self.error_value
        return value

    def score(self, responses: Sequence[str], answers: Sequence[Any]) -> list[float]:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        return [self(r, a) for r, a in zip(responses, answers)]

    def metrics(self, reset: bool = True) -> dict[str, float]:
        out = {"reward/calls": self.calls, "reward/errors": self.errors,
               "reward/error_rate": self.errors / self.calls if self.calls else 0.0}
        if reset:
            self.calls = self.errors = 0
        return out
