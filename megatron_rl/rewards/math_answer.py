"""Math reward: parse the final answer with math-verify and check it against the gold answer."""

from __future__ import annotations

import re
import threading
from typing import Any

_BOXED = re.compile(r"\\boxed\s*\{")


def _timeouts() -> int | None:
    # math-verify times out with signal.alarm, which works only in the main thread; elsewhere (a reward
    # thread pool) run without its timeout rather than raise on every call
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse_gold(answer: str, timeout):
    from math_verify import parse

    gold = parse(answer, parsing_timeout=timeout)
    if not gold and "$" not in answer and "\\boxed" not in answer:
        gold = parse(f"${answer}$", parsing_timeout=timeout)   # a bare LaTeX answer, e.g. \frac12
    return gold


def math_reward(response: str, answer: Any) -> float:
    """1.0 when math-verify finds the response's final answer equal to `answer`, else 0.0.

    The gold answer may be a number, a bare LaTeX expression or a `$...$` / `\\boxed{}` string. The
    response's answer is what math-verify extracts (a `\\boxed{}` first, then the last expression).
    An unparseable gold answer raises: that is a data error, counted by SafeReward.
    """
    from math_verify import verify

    timeout = _timeouts()
    gold = _parse_gold(str(answer), timeout)
    if not gold:
        raise ValueError(f"math reward: cannot parse the gold answer {answer!r}")
    from math_verify import parse

    pred = parse(str(response), parsing_timeout=timeout)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


def boxed_format_reward(response: str, answer: Any = None) -> float:
    """1.0 when the response states its answer in a \\boxed{...}, else 0.0 (a format reward)."""
    return 1.0 if _BOXED.search(str(response)) else 0.0
