import math
import subprocess
import sys
import threading
import time
from pathlib import Path

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


# ---- the reward worker: timeouts, the step budget, no orphans --------------------------------------------
def _alive(pid):
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid, seconds):
    end = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not _alive(pid)


def test_a_hanging_reward_scores_zero_is_counted_and_the_step_finishes():
    safe = SafeReward.from_spec("tests.rewards._fns:hang_on", timeout_s=1.0, step_timeout_s=60.0)
    assert safe.score(["ok"], [None]) == [1.0]
    first = safe.worker.pid
    t0 = time.monotonic()
    assert safe.score(["ok", "hang", "ok"], [None] * 3) == [1.0, 0.0, 1.0]
    assert time.monotonic() - t0 < 1.0 + 15     # the call's limit plus a worker restart
    m = safe.metrics()
    assert m["reward/calls"] == 4 and m["reward/errors"] == 1 and m["reward/timeouts"] == 1
    assert not _alive(first) and safe.worker.pid != first           # killed, reaped, replaced
    second = safe.worker.pid
    safe.close()
    assert not _alive(second) and safe.worker.pid is None


def test_the_step_budget_bounds_a_batch_of_hanging_calls():
    safe = SafeReward.from_spec("tests.rewards._fns:hang_on", timeout_s=1.0, step_timeout_s=2.5)
    t0 = time.monotonic()
    assert safe.score(["hang"] * 20, [None] * 20) == [0.0] * 20
    assert time.monotonic() - t0 < 2.5 + 10
    assert safe.metrics()["reward/timeouts"] == 20
    assert safe.score(["ok"], [None]) == [1.0]                        # the next step starts afresh
    safe.close()


def test_a_crashing_worker_is_an_error_and_the_rest_is_scored():
    safe = SafeReward.from_spec("tests.rewards._fns:crash_on", timeout_s=10.0)
    assert safe.score(["ok", "crash", "ok"], [None] * 3) == [1.0, 0.0, 1.0]
    m = safe.metrics()
    assert m["reward/errors"] == 1 and m["reward/timeouts"] == 0
    safe.close()


def test_a_timeout_kills_what_the_reward_started(tmp_path):
    pid_file = tmp_path / "pid"
    safe = SafeReward.from_spec("tests.rewards._fns:spawn_and_hang", timeout_s=2.0)
    assert safe.score(["x"], [str(pid_file)]) == [0.0]
    assert _gone_within(int(pid_file.read_text()), 5)   # the worker's process group is killed as one
    safe.close()


def test_the_worker_dies_with_its_parent(tmp_path):
    script = ("import sys, time\nfrom megatron_rl.rewards import SafeReward\n"
              "r = SafeReward.from_spec('tests.rewards._fns:const', timeout_s=5.0)\n"
              "r.score(['a'], [None]); print(r.worker.pid, flush=True); time.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    worker = int(proc.stdout.readline())
    assert _alive(worker)
    proc.kill()                                   # kill -9: no atexit, no cleanup in the parent
    proc.wait()
    assert _gone_within(worker, 5)


def test_builtins_that_cannot_hang_stay_in_process_and_lambdas_are_refused():
    assert SafeReward.from_spec("exact_match", timeout_s=30.0).worker is None
    assert SafeReward.from_spec("boxed_format", timeout_s=30.0).worker is None
    math_safe = SafeReward.from_spec("math", timeout_s=30.0)          # sympy can hang: the worker
    assert math_safe.worker is not None
    assert math_safe.score(["\\boxed{12}", "13"], ["12", "12"]) == [1.0, 0.0]
    math_safe.close()
    with pytest.raises(ValueError, match="importable by name"):
        SafeReward(lambda r, a: 1.0, timeout_s=1.0)
    with pytest.raises(ValueError, match="step_timeout_s"):
        SafeReward(user_reward, timeout_s=1.0, step_timeout_s=float("nan"))
