"""Verifiable rewards: math answers (math-verify), exact match, user functions by import path.

A reward function is `fn(response: str, answer) -> float`. Wrap it in `SafeReward` before a run: a
function that raises (or returns a non-number) scores 0 for that sample and is counted, never stopping
the run; with a time limit (the job's reward.timeout_s / step_timeout_s) it runs in a killable worker
process (rewards/worker.py) and a call that overruns scores 0 too. No torch here.
"""

from megatron_rl.rewards.base import BUILTIN_REWARDS, RewardFn, SafeReward, load_reward_fn, resolve_reward
from megatron_rl.rewards.exact import exact_match_reward, normalize_answer
from megatron_rl.rewards.math_answer import boxed_format_reward, math_reward

__all__ = ["BUILTIN_REWARDS", "RewardFn", "SafeReward", "load_reward_fn", "resolve_reward",
           "exact_match_reward", "normalize_answer", "math_reward", "boxed_format_reward"]
