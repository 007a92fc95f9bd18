import math
import threading

import pytest

from megatron_rl.rewards import (SafeReward, boxed_format_reward, exact_match_reward, load_reward_fn,
                                 math_reward, normalize_answer, resolve_reward)


def user_reward(response, answer):
    """Used through its import path below."""
    return 0.5 if answer in response else -0.5


def broken_reward(response, answer):
    raise RuntimeError("verifier crashed")


@pytest.mark.parametrize("response,answer,expected", [
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("so $x = \\frac{2}{4}$, i.e. \\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),   # bare LaTeX gold, equal value
    ("x = 0.5", "$\\frac{1}{2}$", 1.0),                                       # decimal vs fraction
    ("Answer: 3", "3", 1.0),
    ("Answer: 4", "3", 0.0),
    ("$\\boxed{1+x^2}$", "x^2+1", 1.0),                                       # symbolic equality
    ("I give up", "7", 0.0),
    ("", "7", 0.0),                                                           # empty response
])
def test_math_reward_formats(response, answer, expected):
    assert math_reward(response, answer) == expected


def test_math_reward_outside_main_thread():
    # math-verify's signal-based timeout cannot run there: the reward must still work
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward("\\boxed{12}", "12")))
    t.start()
    t.join(60)
    assert out == [1.0]


def test_exact_match():
    assert normalize_answer("  The  Answer. ") == "the answer"
    assert normalize_answer("1,000") == "1000"
    assert exact_match_reward("What is 3 + 4? Answer: 7", "7") == 1.0
    assert exact_match_reward("Answer: 8 \nAnswer: 7.", "7") == 1.0          # the last marker counts
    assert exact_match_reward("Answer: 17", "7") == 0.0
    assert exact_match_reward("Paris", " paris ", marker=None) == 1.0
    assert exact_match_reward("Answer: b", ["a", "B"]) == 1.0                # any of several answers


def test_import_path_and_registry():
    fn = load_reward_fn("tests.rewards.test_rewards:user_reward")
    assert fn("x = 7", "7") == 0.5
    assert resolve_reward("math") is math_reward
    assert resolve_reward("boxed_format") is boxed_format_reward
    assert resolve_reward("tests.rewards.test_rewards:user_reward") is user_reward
    assert resolve_reward("mine", extra={"mine": user_reward}) is user_reward
    with pytest.raises(ValueError, match="not a known name"):
        resolve_reward("no_such_reward")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward_fn("no_such_pkg.mod:f")
    with pytest.raises(ValueError, match="has no attribute"):
        load_reward_fn("tests.rewards.test_rewards:missing")
    with pytest.raises(ValueError, match="package.module:function"):
        load_reward_fn("tests.rewards.test_rewards")


def test_safe_reward_counts_failures_and_scores_zero():
    calls = iter([1.0, RuntimeError("boom"), float("nan"), "not a number", 0.25])

    def flaky(response, answer):
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    safe = SafeReward(flaky)
    scores = safe.score(["a"] * 5, ["a"] * 5)
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.25]
    m = safe.metrics()
    assert m["reward/calls"] == 5 and m["reward/errors"] == 3 and math.isclose(m["reward/error_rate"], 0.6)
    assert safe.metrics()["reward/calls"] == 0          # reset after reading

    broken = SafeReward.from_spec("tests.rewards.test_rewards:broken_reward")
    assert broken("x", "y") == 0.0 and broken.errors == 1
    # an unparseable gold answer is a data error: counted, scored 0, run goes on
    safe_math = SafeReward(math_reward)
    assert safe_math("\\boxed{1}", "") == 0.0 and safe_math.errors == 1
