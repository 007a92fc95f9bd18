"""Exact-match reward on normalised strings."""

from __future__ import annotations

import re
from typing import Any, Optional

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding spaces, quotes, `$` or a final period,
    and without thousands separators in numbers ("1,000" == "1000")."""
    s = _SPACES.sub(" ", str(text)).strip().casefold()
    s = s.strip("$\"'` ").rstrip(".").strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)


def extract_after(text: str, marker: Optional[str]) -> str:
    """The text after the LAST `marker` (e.g. "Answer:"), up to the end of that line; the whole text
    when the marker is None or absent."""
    if not marker:
        return text
    pos = text.rfind(marker)
    if pos < 0:
        return text
    return text[pos + len(marker):].strip().split("\n", 1)[0]


def exact_match_reward(response: str, answer: Any, marker: Optional[str] = "Answer:") -> float:
    """1.0 when the normalised answer part of `response` equals the normalised `answer`, else 0.0.

    The answer part is what follows the last `marker` ("Answer:" by default, the tiny arithmetic task's
    format), or the whole response without one. A list of acceptable answers is allowed.
    """
    got = normalize_answer(extract_after(response, marker))
    answers = answer if isinstance(answer, (list, tuple)) else [answer]
    return 1.0 if any(got == normalize_answer(a) for a in answers) else 0.0
