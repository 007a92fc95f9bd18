"""The launcher on real-cluster situations (issue 14, items 13, 14, 16, 17), through the faked allocation of
tests/test_recipes.py (SLURM variables in the environment, stand-in srun / scontrol on PATH): a CPU node,
a failing rank, a recipe submitted from elsewhere or kept outside the repository, SIGUSR1 sent to the steps
(`scancel --signal=USR1`), and the tiny CPU recipe. A real-SLURM run of the tiny recipe where sbatch exists."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_recipes import REPO, dry_run, step_lines

LAUNCH = REPO / "examples" / "common" / "launch.sh"
# srun stand-in: runs `launch.sh node` once per host of --nodelist with SLURM's per-task variables, each
# task's output into its --output file (%n, %N), as slurmstepd does
FAKE_SRUN = r"""#!/bin/bash
while [[ $1 == --* ]]; do
  [[ $1 == --nodelist=* ]] && list=${1#--nodelist=}
  [[ $1 == --output=* ]] && out=${1#--output=}
  shift
done
IFS=, read -ra hs <<< "$list"
rc=0
for i in "${!hs[@]}"; do
  f=${out//%n/$i}; f=${f//%N/${hs[$i]}}
  SLURMD_NODENAME=${hs[$i]} SLURM_NODEID=$i "$@" > "$f" 2>&1 || { rc=$?; echo "srun: error: ${hs[$i]}: task $i: Exited with exit code $rc" >&2; }
done
exit $rc
"""
FAKE_TORCHRUN = """#!/bin/bash
printf 'RAN OMP_NUM_THREADS=%s %s\\n' "$OMP_NUM_THREADS" "$*" >> "$FAKE_LOG"
"""


def _bin(tmp: Path, **scripts) -> str:
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return f"{d}:{os.environ['PATH']}"


def tiny_hf(path: Path) -> Path:
    """A stand-in for the prepared tiny model: the planner reads only its config.json."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 344,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
        "max_position_embeddings": 128, "rope_theta": 10000.0, "tie_word_embeddings": False}))
    return path


# ---- 13: a CPU node is detected; a PYTHON without torch says so -------------------------------------------
def test_a_node_without_gpu_runs_the_cpu_backend(tmp_path):
    """Real (non-dry) launch on this GPU-less box, no GPUS_PER_NODE: CPU backend, 1 rank of all the job's
    cores, host memory per rank, not 8 GPUs x 80 GiB."""
    log = tmp_path / "calls.log"
    path = _bin(tmp_path, srun=FAKE_SRUN, torchrun=FAKE_TORCHRUN)
    proc = dry_run("tiny_cpu", 1, tmp_path, DRY_RUN="", PATH=path, FAKE_LOG=str(log), GPU_MEMORY_GIB="", TORCHRUN="torchrun",
                   SLURM_CPUS_ON_NODE="6", SLURM_MEM_PER_NODE="12288", HF_DIR=str(tiny_hf(tmp_path / "hf")),
                   DATA="/data/train.jsonl", RUN_DIR=str(tmp_path / "run"))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "1 nodes (gpu001) x 1 CPU ranks (6 threads each) x 12.0 GiB; backend cpu (no GPU on this node" in out
    assert "--backend cpu" in out and "--gpus-per-node 1 --gpu-memory 12.0" in out and "ACCEPTED" in out
    ran = log.read_text().splitlines()
    assert len(ran) == 1 and ran[0].startswith("RAN OMP_NUM_THREADS=6 --nnodes=1 --nproc-per-node=1 "), ran
    assert ran[0].endswith(f"train --config {REPO}/examples/tiny_cpu/config.yaml model.hf_path={tmp_path}/hf "
                           f"run_dir={tmp_path}/run data.train_path=/data/train.jsonl")


def test_a_python_without_torch_is_reported_as_such(tmp_path):
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("needs a python without torch")
    proc = dry_run("qwen2.5-7b", 1, tmp_path, PYTHON=bare)
    assert proc.returncode == 1
    assert f"PYTHON={bare} cannot import torch and megatron_rl" in proc.stderr
    assert "No module named 'torch'" in proc.stderr
    assert "does not fit" not in proc.stdout and "== plan" not in proc.stdout


# ---- 14: a failed step names the failing rank, its host and its last lines ----------------------------------
def test_a_failing_rank_is_named_with_its_host_and_last_lines(tmp_path):
    """Real torchrun (2 CPU ranks) under the srun stand-in; the train step fails at the trainer's start-up
    check (the data file does not exist): the job output shows torchrun's root cause and the rank's stderr."""
    path = _bin(tmp_path, srun=FAKE_SRUN)
    proc = dry_run("tiny_cpu", 1, tmp_path, DRY_RUN="", PATH=path, TORCHRUN=str(Path(sys.executable).parent / "torchrun"),
                   CPU_RANKS_PER_NODE="2", SLURM_CPUS_ON_NODE="2", SLURM_JOB_NODELIST="localhost", HF_DIR=str(tiny_hf(tmp_path / "hf")),
                   DATA=str(tmp_path / "missing.jsonl"), RUN_DIR=str(tmp_path / "run"), MASTER_PORT="29731")
    out = proc.stdout
    assert proc.returncode != 0, out
    assert "launch: step train failed (srun exit 1)" in out, out + proc.stderr
    assert "launch: failing rank " in out and "on host " in out and "Root Cause (first observed failure)" in out
    assert "last 40 lines of rank" in out and "missing.jsonl" in out.split("last 40 lines of rank", 1)[1], out


def test_report_without_a_root_cause_block_tails_the_failed_node(tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "train.node0.gpu001.log").write_text("fine\n")
    (log_dir / "train.node1.gpu002.log").write_text("boom: out of memory\n"
                                                     "launch: node 1 (gpu002) of step train: torchrun exited with 137\n")
    script = f"source {LAUNCH}; LOG_DIR={log_dir} STEP_RANK_LOGS={log_dir}/ranks/train; report_step_failure train 137"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30).stdout
    assert "launch: node 1 (gpu002) of step train: torchrun exited with 137" in out and "boom: out of memory" in out
    assert "fine" not in out


# ---- 16: the repository is found wherever the recipe is submitted from or kept ------------------------------
def test_spool_copy_submitted_from_elsewhere_finds_the_repo(tmp_path):
    """sbatch runs a copy under its spool dir; the submitted path comes from `scontrol show job` (Command=)."""
    spool = tmp_path / "spool" / "job4242"
    spool.mkdir(parents=True)
    shutil.copy(REPO / "examples" / "qwen2.5-7b" / "sbatch.sh", spool / "slurm_script")
    scontrol = f"#!/bin/bash\necho '   Command={REPO}/examples/qwen2.5-7b/sbatch.sh'\necho '   WorkDir=/elsewhere'\n"
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="gpu001", GPU_MEMORY_GIB="80", FORCE_NODELIST_PARSER="1", LOG_ROOT=str(tmp_path / "l"),
               PYTHONWARNINGS="ignore")
    env.pop("REPO_DIR", None)
    run = lambda **e: subprocess.run(["bash", str(spool / "slurm_script")], env={**env, **e}, cwd=tmp_path,
                                     capture_output=True, text=True, timeout=180)
    ok = run(PATH=_bin(tmp_path, scontrol=scontrol))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"--config {REPO}/examples/qwen2.5-7b/config.yaml" in ok.stdout
    lost = run(PATH=os.environ["PATH"] if not shutil.which("scontrol") else "/usr/bin:/bin")
    assert lost.returncode == 1 and "is not the megatron_rl repository" in lost.stderr
    assert "sbatch --export=ALL,REPO_DIR=" in lost.stderr


def test_recipe_outside_the_repo_with_repo_dir(tmp_path):
    mine = tmp_path / "myrecipes" / "qwen7b"
    shutil.copytree(REPO / "examples" / "qwen2.5-7b", mine)
    base = ["bash", str(mine / "sbatch.sh")]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DRY_RUN": "1", "PYTHON": sys.executable,
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu001", "GPU_MEMORY_GIB": "80",
           "FORCE_NODELIST_PARSER": "1", "LOG_ROOT": str(tmp_path / "l"), "PYTHONWARNINGS": "ignore"}
    lost = subprocess.run(base, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert lost.returncode == 1 and "is not the megatron_rl repository" in lost.stderr
    ok = subprocess.run(base, env={**env, "REPO_DIR": str(REPO)}, cwd=tmp_path, capture_output=True, text=True,
                        timeout=180)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"--config {mine}/config.yaml" in ok.stdout and step_lines(ok.stdout, "convert")
    # a REPO_DIR that is not a checkout fails in the dry run where the real run would (the conversion tool)
    fake = tmp_path / "notrepo"
    (fake / "examples" / "common").mkdir(parents=True)
    shutil.copy(LAUNCH, fake / "examples" / "common" / "launch.sh")
    bad = subprocess.run(base, env={**env, "REPO_DIR": str(fake)}, cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    assert bad.returncode == 1 and "tools/convert_hf_to_megatron.py is missing" in bad.stderr


WORKER = """import os, signal, sys, time
from pathlib import Path
seen = []
signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))     # what the loop's StopRequest does
Path(os.environ["READY"] + os.environ["LOCAL_RANK"]).touch()
stop = Path(os.environ["RUN_DIR"]) / "STOP"
for _ in range(600):
    if seen and stop.exists():
        print("worker: got SIGUSR1 and STOP: checkpointing, exiting", flush=True)
        sys.exit(0)
    time.sleep(0.1)
sys.exit(5)
"""


def test_sigusr1_to_the_step_reaches_the_ranks_and_torchrun_survives(tmp_path):
    """`scancel --signal=USR1 JOB` signals every process of the steps: the node wrapper, torchrun and the
    ranks. torchrun (real) must survive it, the ranks see it, the wrapper writes run_dir/STOP."""
    (tmp_path / "w.py").write_text(WORKER)
    run_dir = tmp_path / "run"
    env = dict(os.environ, STEP_HOSTS_Q="localhost", STEP_CMD_Q="w.py", STEP_NNODES="1", STEP_NPROC="2",
               STEP_MASTER="127.0.0.1", STEP_PORT="29733", STEP_RANK_LOGS=str(tmp_path / "ranks"), STEP_NAME="train",
               STEP_STOP_FILE=str(run_dir / "STOP"), TORCHRUN=str(Path(sys.executable).parent / "torchrun"),
               RUN_DIR=str(run_dir), READY=str(tmp_path / "ready"), SLURMD_NODENAME="localhost")
    proc = subprocess.Popen(["bash", str(LAUNCH), "node"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        import psutil   # every process of the step, as slurmstepd does (torchrun starts the ranks in sessions
        root = psutil.Process(proc.pid)           # of their own: not one process group)
        for p in [root, *root.children(recursive=True)]:
            p.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert out.count("worker: got SIGUSR1 and STOP") == 2 and "asked the RL loop to checkpoint and stop" in out


def test_stop_request_during_start_up_counts(tmp_path, monkeypatch):
    """StopRequest: a STOP written after the launcher started the step (MRL_STOP_SINCE) is live even if the
    rank started later; an older one is the previous job's and is removed. A signal after the handler is
    installed counts at the first check (the loop checks right after start-up)."""
    import torch.distributed as dist

    from megatron_rl.trainer.loop import StopRequest

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        (tmp_path / "STOP").touch()
        old = time.time() - 3600
        os.utime(tmp_path / "STOP", (old, old))
        stop = StopRequest(tmp_path)
        assert not (tmp_path / "STOP").exists() and not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() and stop.reason == "SIGUSR1"
        stop.close()
        monkeypatch.setenv("MRL_STOP_SINCE", str(int(time.time()) - 600))
        (tmp_path / "STOP").touch()                   # older than this process, newer than the step's start
        stop = StopRequest(tmp_path)
        assert stop.requested() and stop.reason == f"file {tmp_path / 'STOP'}"
        stop.close()
    finally:
        dist.destroy_process_group()


# ---- 17: the tiny CPU recipe ---------------------------------------------------------------------------------
def test_tiny_cpu_recipe_dry_run(tmp_path):
    proc = dry_run("tiny_cpu", 1, tmp_path, GPU_MEMORY_GIB="", SLURM_CPUS_ON_NODE="4", SLURM_MEM_PER_NODE="16384",
                   HF_DIR=str(tiny_hf(tmp_path / "hf")), DATA="/d/train.jsonl")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "backend cpu (the recipe asks for no GPU)" in out and "ACCEPTED" in out
    assert "step convert: skipped" in out        # no model.checkpoint: the trainer converts once itself
    (rank, host, argv), = step_lines(out, "train")
    assert argv[:3] == [str(REPO / ".venv" / "bin" / "torchrun") if (REPO / ".venv/bin/torchrun").exists()
                        else "torchrun", "--nnodes=1", "--nproc-per-node=1"]
    assert argv[-4:-1] == ["--config", str(REPO / "examples" / "tiny_cpu" / "config.yaml"), f"model.hf_path={tmp_path}/hf"]
    text = (REPO / "examples" / "tiny_cpu" / "sbatch.sh").read_text()
    assert "#SBATCH --gpus" not in text and "--requeue" in text and "--signal=B:USR1@" in text


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs a SLURM cluster (sbatch)")
@pytest.mark.slow
def test_tiny_cpu_recipe_under_real_sbatch(tmp_path):
    out = tmp_path / "job.out"
    sub = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={out}", "--export=ALL,"
                          f"RUN_DIR={tmp_path / 'run'},EXTRA_OVERRIDES=train.steps=2",
                          str(REPO / "examples" / "tiny_cpu" / "sbatch.sh")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=3600)
    assert sub.returncode == 0, sub.stdout + sub.stderr + (out.read_text() if out.exists() else "")
    assert (tmp_path / "run" / "hf_final" / "config.json").is_file(), out.read_text()
