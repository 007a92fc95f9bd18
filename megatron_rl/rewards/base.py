"""Reward functions by name or import path, and the wrapper that keeps a bad one from stopping a run."""

from __future__ import annotations

import importlib
import logging
import math
import time
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


# Built-ins that run in the trainer's process: linear-time regexes and string compares over one bounded
# response, so they cannot hang, and a worker round trip would only add cost. Everything else (math-verify,
# which calls sympy, and every user function) runs in the killable reward worker (rewards/worker.py).
INPROCESS_SAFE = frozenset({exact_match_reward, boxed_format_reward})


def import_path(fn: RewardFn) -> str:
    """"package.module:function" for a module-level function: how the reward worker imports it."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise ValueError(f"reward {getattr(fn, '__name__', fn)!r} must be importable by name "
                         f"('package.module:function') to run in the reward worker; a lambda, a nested "
                         f"function or one defined in __main__ is not")
    path = f"{module}:{qualname}"
    if load_reward_fn(path) is not fn:
        raise ValueError(f"reward {path!r} does not import back as the same function")
    return path


class SafeReward:
    """Calls a reward function; an exception, a non-finite / non-numeric result or a timeout gives
    `error_value` for that sample and is counted (`metrics()`), and the run goes on.

    timeout_s: the limit of one call; step_timeout_s: of one `score()` batch (the step's budget; the
    samples left when it runs out score `error_value`, counted as timeouts). With a limit the function
    runs in a worker process that is killed on a timeout and restarted (rewards/worker.py), except the
    built-ins that cannot hang (INPROCESS_SAFE). timeout_s=None: in-process with no limit, for library
    use and tests only (the job's config always sets one: reward.timeout_s)."""

    def __init__(self, fn: RewardFn, name: Optional[str] = None, error_value: float = 0.0,
                 log_first: int = 3, timeout_s: Optional[float] = None, step_timeout_s: Optional[float] = None,
                 fn_path: Optional[str] = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")
        self.error_value = float(error_value)
        self.log_first = log_first
        self.timeout_s = timeout_s
        self.step_timeout_s = step_timeout_s if step_timeout_s is not None else timeout_s
        for key, value in (("timeout_s", self.timeout_s), ("step_timeout_s", self.step_timeout_s)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SafeReward: `{key}` must be a finite number > 0 or None, got {value}")
        self.worker = None
        if timeout_s is not None and not any(fn is safe for safe in INPROCESS_SAFE):
            from megatron_rl.rewards.worker import RewardWorker

            # started at the first score(): only the rank that scores (global rank 0) has a child
            self.worker = RewardWorker(fn_path or import_path(fn), name=self.name)
        self.calls = 0
        self.errors = 0            # every sample scored error_value: exceptions, bad values, timeouts
        self.timeouts = 0          # of which timed out (the call's limit or the step's budget)

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> "SafeReward":
        fn = resolve_reward(spec)
        return cls(fn, name=spec, fn_path=spec if ":" in spec else None, **kwargs)

    def __call__(self, response: str, answer: Any) -> float:
        return self.score([response], [answer])[0]

    def score(self, responses: Sequence[str], answers: Sequence[Any]) -> list[float]:
        """One reward per response; a batch is one worker round trip (results stream back per call)."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self.worker is None:
            return [self._accept(*self._call_here(r, a)) for r, a in zip(responses, answers)]
        deadline = time.monotonic() + self.step_timeout_s
        results = self.worker.run(list(zip(responses, answers)), self.timeout_s, deadline)
        unscored = sum(kind == "budget" for kind, _ in results)
        if unscored:
            log.warning("reward %s: the step's budget of %g s (reward.step_timeout_s) ran out; %d of %d samples "
                        "scored %s", self.name, self.step_timeout_s, unscored, len(results), self.error_value)
        return [self._accept(kind, value) for kind, value in results]

    def _call_here(self, response: str, answer: Any) -> tuple[str, Any]:
        try:
            return "ok", float(self.fn(response, answer))
        except Exception as e:   # a broken verifier costs one sample's reward, never the run
            return "error", f"{type(e).__name__}: {e}"

    def _accept(self, kind: str, value: Any) -> float:
        self.calls += 1
        if kind == "ok" and not math.isfinite(value):
            kind, value = "error", f"ValueError: returned {value}"
        if kind == "ok":
            return value
        self.errors += 1
        timed_out = kind in ("timeout", "budget")
        self.timeouts += timed_out
        if self.errors <= self.log_first:
            log.warning("reward %s %s on a sample (scored %s): %s", self.name,
                        "timed out" if timed_out else "failed", self.error_value, value)
        return self.error_value

    def metrics(self, reset: bool = True) -> dict[str, float]:
        out = {"reward/calls": self.calls, "reward/errors": self.errors, "reward/timeouts": self.timeouts,
               "reward/error_rate": self.errors / self.calls if self.calls else 0.0}
        if reset:
            self.calls = self.errors = self.timeouts = 0
        return out

    def close(self) -> None:
        """End the worker process (a later score() starts a new one)."""
        if self.worker is not None:
            self.worker.close()
