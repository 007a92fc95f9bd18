"""The sbatch scripts' time-limit path, run for real (not a dry run) with stand-ins for SLURM's srun and
scontrol: on SIGUSR1 the launcher asks the RL loop to checkpoint (run_dir/STOP, which trainer/loop.py
obeys: tests/trainer/test_loop.py), waits for the train step to exit, and only then requeues the job."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_recipes import converted

REPO = Path(__file__).resolve().parents[1]

FAKE_SRUN = """#!/bin/bash
# stands in for the train step: runs until the launcher writes run_dir/STOP, then "checkpoints" and exits
echo "srun $*" >> "$FAKE_LOG"
echo $$ > "$FAKE_LOG.pid"
touch "$FAKE_LOG.started"
for _ in $(seq 1200); do
  if [[ -f $RUN_DIR/STOP ]]; then echo "train step: saw STOP, checkpointed, exiting" >> "$FAKE_LOG"; exit 0; fi
  sleep 0.1
done
exit 3
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


def _launch(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL, **env_extra):
    """Start the 7B recipe's sbatch script for real with the stand-ins; returns (process, calls log) once
    the stand-in srun of the first step is running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", srun), ("scontrol", scontrol)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "PYTHON": sys.executable,
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu001", "FORCE_NODELIST_PARSER": "1",
           "GPU_MEMORY_GIB": "80", "GPUS_PER_NODE": "8", "LOG_ROOT": str(tmp_path / "logs"), "RUN_DIR": str(tmp_path / "run"),
           "FAKE_LOG": str(log), "PYTHONWARNINGS": "ignore", **env_extra}
    proc = subprocess.Popen(["bash", str(REPO / "examples" / "qwen2.5-7b" / "sbatch.sh")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not Path(f"{log}.started").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.communicate())
        time.sleep(0.1)
    return proc, log


def _signal_and_wait(proc, log):
    try:
        proc.send_signal(signal.SIGUSR1)          # what `#SBATCH --signal=B:USR1@300` sends to the batch shell
        proc.wait(timeout=60)
    finally:
        proc.kill()
        pid = Path(f"{log}.pid")                  # a stand-in step the launcher left running holds the pipes
        try:
            os.kill(int(pid.read_text()), signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError):
            pass
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # `scontrol show job` (the submitted script's path, whether the job may requeue) only reads
    return out, [c for c in log.read_text().splitlines() if not c.startswith("scontrol show job")]


def test_time_limit_signal_stops_the_loop_at_a_checkpoint_then_requeues(tmp_path):
    ckpt = converted(tmp_path / "ckpt", "Qwen2.5-7B")
    proc, log = _launch(tmp_path, SKIP_CONVERT="1", CKPT_DIR=str(ckpt))
    out, calls = _signal_and_wait(proc, log)
    assert calls[0].startswith("srun ") and "--nodelist=gpu001" in calls[0] and "/train.node" in calls[0]
    # the loop's checkpoint comes first, the requeue after the train step has exited
    assert calls[1:] == ["train step: saw STOP, checkpointed, exiting", "scontrol requeue 4242"], calls
    assert f"asked the RL loop to checkpoint and stop ({tmp_path / 'run'}/STOP)" in out
    assert "requeueing job 4242 (restart 1)" in out and "did not stop" not in out


def test_time_limit_signal_during_the_conversion_requeues_at_once(tmp_path):
    """Only the train step reads STOP: during the conversion the launcher neither writes it (the next job's
    loop would stop at once) nor waits for it; the requeued job converts again (its output is atomic)."""
    proc, log = _launch(tmp_path, CKPT_DIR=str(tmp_path / "not_converted_yet"))
    t0 = time.monotonic()
    out, calls = _signal_and_wait(proc, log)
    assert time.monotonic() - t0 < 30
    assert calls[0].startswith("srun ") and "/convert.node" in calls[0], calls    # the conversion step's srun
    assert calls[1:] == ["scontrol requeue 4242"], calls
    assert not (tmp_path / "run" / "STOP").exists() and "asked the RL loop" not in out


# ---- a finished run is not requeued; a job that may not requeue does not fail (issue 14 item 12) ---------------
FINISHING_SRUN = FAKE_SRUN.replace(
    'echo "train step: saw STOP, checkpointed, exiting" >> "$FAKE_LOG"; exit 0',
    'mkdir -p "$RUN_DIR/hf_final"; echo {} > "$RUN_DIR/hf_final/config.json"; echo "train step: last step, '
    'exported" >> "$FAKE_LOG"; exit 0')


def test_a_finished_run_is_not_requeued(tmp_path):
    """The stop request reaches the loop during its last step: it exports run_dir/hf_final (atomically) and
    exits; a requeue would restart a job with nothing to do."""
    ckpt = converted(tmp_path / "ckpt", "Qwen2.5-7B")
    proc, log = _launch(tmp_path, srun=FINISHING_SRUN, SKIP_CONVERT="1", CKPT_DIR=str(ckpt))
    out, calls = _signal_and_wait(proc, log)
    assert calls[1:] == ["train step: last step, exported"], calls
    assert f"the run is complete ({tmp_path / 'run'}): not requeueing" in out


NO_REQUEUE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
[[ $1 == show ]] && echo "   Requeue=0 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0"
exit 0
"""
REFUSING_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ $1 == requeue ]]; then echo "scontrol: error: Requested operation is presently disabled" >&2; exit 1; fi
"""


def test_no_requeue_job_is_not_requeued_and_does_not_fail(tmp_path):
    """`sbatch --no-requeue`: scontrol shows Requeue=0; the trap says so and the job ends 0 (not FAILED)."""
    ckpt = converted(tmp_path / "ckpt", "Qwen2.5-7B")
    proc, log = _launch(tmp_path, scontrol=NO_REQUEUE_SCONTROL, SKIP_CONVERT="1", CKPT_DIR=str(ckpt))
    out, calls = _signal_and_wait(proc, log)      # asserts exit 0
    assert calls[1:] == ["train step: saw STOP, checkpointed, exiting"], calls
    assert "submitted without requeue (--no-requeue): not requeueing" in out


def test_a_refused_requeue_does_not_fail_the_job(tmp_path):
    ckpt = converted(tmp_path / "ckpt", "Qwen2.5-7B")
    proc, log = _launch(tmp_path, scontrol=REFUSING_SCONTROL, SKIP_CONVERT="1", CKPT_DIR=str(ckpt))
    out, calls = _signal_and_wait(proc, log)      # asserts exit 0
    assert calls[1:] == ["train step: saw STOP, checkpointed, exiting", "scontrol requeue 4242"], calls
    assert "scontrol requeue 4242 was refused (see above): not requeued" in out
