"""A child process that dies with its parent: the engine servers (rollout/remote_server.py) and the reward
worker (rewards/worker.py) both must never outlive the trainer, whatever kills it.

Two mechanisms, because neither is enough alone:
- the parent-death signal (Linux prctl PR_SET_PDEATHSIG): the kernel signals this process when its parent
  exits, kill -9 included; fast, but sent only by a parent that dies after the call, and a handled signal
  runs only when the main thread returns to Python;
- a watchdog thread polling the parent pid: sure, a poll period late.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable


def set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig): the kernel sends `sig` to this process when its parent (strictly: the
    parent's thread that forked it) exits, however it exits. Linux only; False elsewhere. Kept across exec,
    so it also holds for a process started by a launcher's Popen."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(1, int(sig), 0, 0, 0) == 0      # 1 = PR_SET_PDEATHSIG


def tie_to_parent(parent_pid: int, sig: int, on_gone: Callable[[str], None], poll_s: float = 1.0) -> None:
    """Arm the death signal `sig` (its handler, if any, is the caller's), then call `on_gone(why)` if the
    parent `parent_pid` is already gone (it died before the prctl: no signal comes), and from a watchdog
    thread whenever this process is re-parented. on_gone is expected to end the process."""
    set_parent_death_signal(sig)
    if os.getppid() != parent_pid:
        on_gone(f"parent process {parent_pid} exited before I started")

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                on_gone(f"parent process {parent_pid} is gone")

    threading.Thread(target=watch, name="mrl-parent-watchdog", daemon=True).start()
