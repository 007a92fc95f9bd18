"""Run one test body on N gloo ranks, each in its own process, and report every rank's failure.

    results = run_ranks(body, world_size=4, args=(...), timeout=120)

`body(rank, world_size, *args)` must be a module-level function (processes are spawned, so it is
imported by name). The default process group is initialised (gloo, a fresh free port) before the body
runs and destroyed after. `run_ranks` returns the bodies' return values by rank (picklable values).

Failure handling, so that a broken rank never hangs the suite:
- a rank that raises writes its traceback; once one rank fails, the others get `grace` seconds to
  finish or fail too, then are killed, and the case fails with every failed rank's traceback;
- a rank that dies without a report (segfault, os._exit) is reported with its exit code;
- after `timeout` seconds every live rank dumps its Python stack (faulthandler on SIGUSR1) and is
  killed; the error names the ranks that hung and shows where they were.
Each rank runs in its own session (process group), so killing it also kills what it spawned
(e.g. dist-checkpointing's multiprocessing helpers), and nothing outside this case is touched.
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(body, rank, world_size, port, args, kwargs, workdir, collective_timeout, threads):
    os.setsid()  # own process group: the parent can kill us and our children together
    workdir = Path(workdir)
    stack_file = open(workdir / f"rank{rank}.stack", "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    outcome: tuple[str, Any]
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            outcome = ("ok", body(rank, world_size, *args, **kwargs))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        outcome = ("error", traceback.format_exc())
    tmp = workdir / f"rank{rank}.result.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(outcome, f)
    os.replace(tmp, workdir / f"rank{rank}.result")


class MultiRankError(AssertionError):
    pass


def run_ranks(body: Callable, world_size: int, args: Sequence = (), kwargs: dict | None = None,
              timeout: float = 180.0, grace: float = 3.0, threads: int = 1) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="multirank-") as workdir:
        wd = Path(workdir)
        procs = [ctx.Process(target=_rank_main, name=f"rank{r}",
                             args=(body, r, world_size, port, tuple(args), kwargs or {}, workdir,
                                   max(timeout, 10.0), threads))
                 for r in range(world_size)]
        for p in procs:
            p.start()

        def result(r):
            f = wd / f"rank{r}.result"
            return pickle.loads(f.read_bytes()) if f.exists() else None

        deadline = time.monotonic() + timeout
        first_failure = None
        while True:
            now = time.monotonic()
            alive = [r for r, p in enumerate(procs) if p.is_alive()]
            for r, p in enumerate(procs):
                if r in alive:
                    continue
                res = result(r)
                if (res is None or res[0] != "ok") and first_failure is None:
                    first_failure = now
            if not alive:
                break
            if first_failure is not None and now - first_failure > grace:
                break
            if now > deadline:
                break
            time.sleep(0.02)

        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        timed_out = bool(hung) and first_failure is None
        if timed_out:
            for r in hung:  # ask for a stack dump before killing
                try:
                    os.kill(procs[r].pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for r in hung:
            try:
                os.killpg(procs[r].pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            p.join(5)

        errors, values = [], []
        for r, p in enumerate(procs):
            res = result(r)
            if res is not None and res[0] == "ok":
                values.append(res[1])
                continue
            values.append(None)
            if res is not None:
                errors.append(f"--- rank {r} raised:\n{res[1]}")
            elif r in hung:
                stack = (wd / f"rank{r}.stack").read_text() if timed_out else ""
                why = (f"still running after the {timeout:.0f}s timeout; its stack:\n{stack}" if timed_out
                       else "killed: still running after another rank failed")
                errors.append(f"--- rank {r} {why}")
            else:
                errors.append(f"--- rank {r} died without a report (exit code {p.exitcode})")
        if errors:
            head = (f"{world_size}-rank case timed out after {timeout:.0f}s" if timed_out
                    else f"{world_size}-rank case failed")
            raise MultiRankError(head + "\n" + "\n".join(errors))
        return values
