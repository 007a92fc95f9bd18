"""A reward function run in a child process that can be killed: the per-call and per-step time limits.

A verifier that hangs (sympy on a pathological expression, a sandbox that never answers, user code
waiting on a lock) must not hang the step: in-process there is no safe way to stop a Python call (a
thread cannot be killed and math-verify's own signal.alarm works only in the main thread). So the
function runs in one child process, `python -m megatron_rl.rewards.worker`, that the parent kills when a
call overruns, then restarts for the rest of the batch.

Why a plain subprocess and not multiprocessing: the trainer process holds CUDA, NCCL and vLLM threads, so
forking it is unsafe, and spawn / forkserver re-import the launching script (the whole trainer, torch
included) in every child. The child here imports only this module and the reward function, by its
import path ("package.module:function"), which is also how the job names it.

Protocol over two pipes (multiprocessing.connection framing, pickled tuples):
    child -> parent   ("ready",) once the function is imported, or ("fail", "why")
    parent -> child   ("batch", [(response, answer), ...])   one round trip per step
    child -> parent   ("ok", float) | ("error", "Type: message")   one per item, in order
Results stream back per item, so the parent knows which call is running and gives each its own
deadline (the time since the previous result) without a round trip per call.

Lifetime: the child is its own process group (the parent kills the group, so processes the user's code
started die too), asks the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), and a
watchdog thread exits when it is re-parented: it never outlives the trainer.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any, Optional, Sequence

from megatron_rl.utils import lifetime

log = logging.getLogger(__name__)

# the child imports the function and (math-verify) sympy: seconds, not the per-call timeout
STARTUP_S = 120.0
_LIVE: "weakref.WeakSet[RewardWorker]" = weakref.WeakSet()


class RewardWorker:
    """The parent's handle on one child process running `fn_path` ("package.module:function").
    `run()` scores a batch within the limits; `close()` ends the child (also at interpreter exit)."""

    def __init__(self, fn_path: str, name: Optional[str] = None):
        self.fn_path, self.name = fn_path, name or fn_path
        self.proc: Optional[subprocess.Popen] = None
        self._send: Optional[Connection] = None
        self._recv: Optional[Connection] = None
        self.restarts = 0          # children killed (a timeout) or lost (crashed), for the metrics
        _LIVE.add(self)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    # ---- scoring ------------------------------------------------------------------------------------------
    def run(self, items: Sequence[tuple[str, Any]], timeout_s: float,
            deadline: float) -> list[tuple[str, Any]]:
        """One (kind, value) per item, in order: ("ok", float), ("error", why), ("timeout", why) or
        ("budget", why). A call running longer than `timeout_s` is a timeout (the child is killed and
        restarted for the rest); at time.monotonic() >= `deadline` (the step's budget) every item left
        is "budget"."""
        out: list[tuple[str, Any]] = []
        while len(out) < len(items):
            now = time.monotonic()
            if now >= deadline:
                why = "the step's reward budget (reward.step_timeout_s) ran out before this sample"
                out += [("budget", why)] * (len(items) - len(out))
                self._kill()   # it may be mid-call: a clean child for the next step
                break
            started = self._ensure_started(min(deadline, now + STARTUP_S))
            if started is not None:   # the child cannot run the function: the rest score as errors
                kind = "budget" if time.monotonic() >= deadline else "error"
                out += [(kind, started)] * (len(items) - len(out))
                break
            out += self._run_started(items[len(out):], timeout_s, deadline)
        return out

    def _run_started(self, items, timeout_s, deadline) -> list[tuple[str, Any]]:
        """Send the items, collect results until all are in or one overruns / the child dies."""
        out: list[tuple[str, Any]] = []
        try:
            self._send.send(("batch", list(items)))
        except (OSError, EOFError, ValueError):   # the child died between steps: restart, resend
            self._kill(lost=True)
            return out
        call_deadline = time.monotonic() + timeout_s
        while len(out) < len(items):
            wait_s = min(call_deadline, deadline) - time.monotonic()
            try:
                ready = wait_s > 0 and self._recv.poll(wait_s)
                msg = self._recv.recv() if ready else None
            except (OSError, EOFError):
                out.append(("error", f"the reward worker died during the call (exit code "
                                     f"{self._exit_code()})"))
                self._kill(lost=True)
                return out
            if msg is None:
                if time.monotonic() >= deadline and time.monotonic() < call_deadline:
                    return out   # the step budget, not this call: run() marks the rest
                out.append(("timeout", f"the call ran longer than reward.timeout_s = {timeout_s:g} s"))
                self._kill()
                return out
            out.append(msg)
            call_deadline = time.monotonic() + timeout_s
        return out

    # ---- the child's lifetime -------------------------------------------------------------------------
    def _ensure_started(self, deadline: float) -> Optional[str]:
        """None when a child is running and has imported the function, else why not."""
        if self.proc is not None and self.proc.poll() is None:
            return None
        if self.proc is not None:   # exited on its own since the last batch
            self._kill(lost=True)
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        # the parent's import path (a test's rootdir, a user's PYTHONPATH edits) so the same module imports
        env["PYTHONPATH"] = os.pathsep.join(p if p else os.getcwd() for p in sys.path)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "megatron_rl.rewards.worker", str(p2c_r), str(c2p_w), self.fn_path,
                 str(os.getpid())], pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)   # its own process group, killed as one
        finally:
            os.close(p2c_r)   # the child's ends: once it dies, our reads see EOF instead of blocking
            os.close(c2p_w)
        self._send, self._recv = Connection(p2c_w, readable=False), Connection(c2p_r, writable=False)
        try:
            ready = self._recv.poll(max(0.0, deadline - time.monotonic()))
            msg = self._recv.recv() if ready else ("fail", "the reward worker did not start in time")
        except (OSError, EOFError):
            msg = ("fail", f"the reward worker exited at start-up (exit code {self._exit_code()})")
        if msg[0] != "ready":
            self._kill(lost=True)
            return msg[1]
        return None

    def _exit_code(self) -> Optional[int]:
        try:
            return self.proc.wait(timeout=1.0) if self.proc is not None else None
        except subprocess.TimeoutExpired:
            return None

    def _kill(self, lost: bool = False) -> None:
        """SIGKILL the child's process group and reap it (no zombie, no orphan)."""
        proc, self.proc = self.proc, None
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._send = self._recv = None
        if proc is None:
            return
        self.restarts += 1
        if proc.poll() is None or lost:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:   # unkillable (D state): nothing more to do from here
            log.warning("reward worker %d did not exit after SIGKILL", proc.pid)

    def close(self) -> None:
        restarts = self.restarts
        self._kill()
        self.restarts = restarts   # closing is not a restart

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@atexit.register
def _close_all() -> None:
    for worker in list(_LIVE):
        worker.close()


# ---- the child --------------------------------------------------------------------------------------------
def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def _child_main(argv: list[str]) -> None:
    recv_fd, send_fd, fn_path, parent_pid = int(argv[0]), int(argv[1]), argv[2], int(argv[3])
    # SIGKILL from the kernel when the parent dies; the watchdog when re-parented (utils/lifetime.py)
    lifetime.tie_to_parent(parent_pid, signal.SIGKILL, lambda why: os._exit(1))
    recv, send = Connection(recv_fd, writable=False), Connection(send_fd, readable=False)
    try:
        from megatron_rl.rewards.base import load_reward_fn

        fn = load_reward_fn(fn_path)
    except BaseException as e:   # noqa: BLE001  (reported to the parent, which scores the batch as errors)
        send.send(("fail", f"cannot load the reward function {fn_path!r} in the worker: {_describe(e)}"))
        return
    send.send(("ready",))
    while True:
        try:
            msg = recv.recv()
        except EOFError:   # the parent closed the channel: done
            return
        if msg[0] != "batch":
            return
        for response, answer in msg[1]:
            try:
                send.send(("ok", float(fn(response, answer))))
            except BaseException as e:   # noqa: BLE001  (SystemExit / KeyboardInterrupt in user code too)
                send.send(("error", _describe(e)))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
