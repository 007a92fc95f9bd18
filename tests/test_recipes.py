"""The SLURM recipes (examples/<recipe>/): each config loads, the planner accepts it on its stated cluster
and refuses a too-small one with the reason, and the sbatch script's dry run (a faked SLURM allocation)
prints, per node, the exact torchrun command that a real run executes through srun."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rl.convert import to_model_config
from megatron_rl.trainer.config import load_rl_config
from megatron_rl.trainer.plan import KNOWN_MODELS

REPO = Path(__file__).resolve().parents[1]
# recipe -> (stated nodes, TP, PP, model directory name)
RECIPES = {"qwen2.5-7b": (1, 4, 1, "Qwen2.5-7B-Instruct"), "qwen2.5-32b": (4, 8, 2, "Qwen2.5-32B-Instruct"),
           "llama3.3-70b": (8, 8, 4, "Llama-3.3-70B-Instruct")}
# recipe -> (nodes, GiB per GPU, the reason the planner must give)
TOO_SMALL = {
    "qwen2.5-7b": (1, 40, "pipeline stage 0 needs 49.2 GiB per GPU while training (35.2 trainer + 14.0 engine) "
                          "but the GPU has 40 GiB"),
    "qwen2.5-32b": (2, 80, "pipeline stage 0 needs 87.0 GiB per GPU while training"),
    # with train.recompute: full the recipe fits 4 nodes of 80 GiB too (75.5 GiB); 2 nodes cannot hold the
    # layout at all (test_dry_run_refuses_a_world_size_the_layout_cannot_split)
    "llama3.3-70b": (4, 64, "pipeline stage 0 needs 69.9 GiB per GPU while training (47.5 trainer + 22.4 engine) "
                            "but the GPU has 64 GiB"),
}
LAUNCH = REPO / "examples" / "common" / "launch.sh"


def converted(path: Path, model: str) -> Path:
    """A stand-in converted checkpoint: the metadata file the planner and the launcher look at."""
    path.mkdir()
    cfg = to_model_config(KNOWN_MODELS[model], dtype="bfloat16")
    (path / "megatron_rl_model.json").write_text(json.dumps({"model_config": cfg.to_dict()}))
    return path


def hosts(n: int) -> list[str]:
    return [f"gpu{i + 1:03d}" for i in range(n)]


def dry_run(recipe: str, nodes: int, tmp: Path, gpu_gib: float = 80, **env) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp), "DRY_RUN": "1", "PYTHON": sys.executable,
            "SLURM_JOB_ID": "4242", "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
            "GPU_MEMORY_GIB": str(gpu_gib), "LOG_ROOT": str(tmp / "logs"), "FORCE_NODELIST_PARSER": "1",
            "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", str(REPO / "examples" / recipe / "sbatch.sh")], env={**base, **env}, cwd=tmp,
                          capture_output=True, text=True, timeout=180)


def step_lines(out: str, step: str) -> list[tuple[int, str, list[str]]]:
    """(node rank, host, argv) of every `node` line of one step of a dry run."""
    lines, inside = [], False
    for line in out.splitlines():
        if line.startswith("== "):
            inside = line.startswith(f"== step {step}:")
        elif inside and line.startswith("node "):
            head, cmd = line.split(": ", 1)
            _, rank, host = head.split()
            lines.append((int(rank), host, shlex.split(cmd)))
    return lines


@pytest.fixture(scope="module", params=sorted(RECIPES))
def accepted(request, tmp_path_factory):
    recipe = request.param
    tmp = tmp_path_factory.mktemp(recipe)
    return recipe, dry_run(recipe, RECIPES[recipe][0], tmp), tmp


def test_recipe_configs_load():
    for recipe in RECIPES:
        cfg = load_rl_config(REPO / "examples" / recipe / "config.yaml")
        assert cfg.checkpoint.resume and cfg.model.checkpoint and cfg.model.hf_path.endswith(RECIPES[recipe][3])
        text = (REPO / "examples" / recipe / "config.yaml").read_text()
        # the memory settings are written out, so a reader sees what the planner assumed
        assert "recompute:" in text and "sequence_parallel:" in text
    assert load_rl_config(REPO / "examples" / "llama3.3-70b" / "config.yaml").train.recompute == "full"


def test_dry_run_resolves_and_the_planner_accepts(accepted):
    recipe, proc, tmp = accepted
    nodes, tp, pp, model_dir = RECIPES[recipe]
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "ACCEPTED: worst GPU" in out and f"layout  TP {tp} x PP {pp}" in out
    config = str(REPO / "examples" / recipe / "config.yaml")
    log_dir = tmp / "logs" / "4242" / "restart0"
    assert f"logs: {log_dir}" in out
    assert "--requeue" in (REPO / "examples" / recipe / "sbatch.sh").read_text()
    assert "scontrol requeue 4242" in out and "checkpoint.resume=True" in out

    convert = step_lines(out, "convert")
    conv_nodes = max(1, tp * pp // 8)
    assert [(r, h) for r, h, _ in convert] == list(enumerate(hosts(nodes)))[:conv_nodes]
    for rank, host, argv in convert:
        assert argv[:6] == ["torchrun", f"--nnodes={conv_nodes}", f"--nproc-per-node={min(8, tp * pp)}",
                            f"--node-rank={rank}", "--master-addr=gpu001", argv[5]]
        # every rank's output also in its own file, for the failure report (tests/test_launch_slurm.py)
        assert argv[6:8] == [f"--log-dir={log_dir}/ranks/convert/node{rank}", "--tee=3"]
        assert argv[8:] == ["tools/convert_hf_to_megatron.py", "--hf-dir", f"models/{model_dir}", "--out",
                            f"checkpoints/{recipe}-tp{tp}pp{pp}", "--tp", str(tp), "--pp", str(pp)]

    train = step_lines(out, "train")
    assert [(r, h) for r, h, _ in train] == list(enumerate(hosts(nodes)))
    ports = set()
    for rank, host, argv in train:
        assert argv[:5] == ["torchrun", f"--nnodes={nodes}", "--nproc-per-node=8", f"--node-rank={rank}",
                            "--master-addr=gpu001"]
        ports.add(argv[5])
        assert argv[6:8] == [f"--log-dir={log_dir}/ranks/train/node{rank}", "--tee=3"]
        assert argv[8:] == ["-m", "megatron_rl.trainer.cli", "train", "--config", config]
    assert len(ports) == 1 and ports != {convert[0][2][5]}     # one rendezvous per step
    srun = [line for line in out.splitlines() if line.startswith("== step train:")][0]
    assert f"--output={log_dir}/train.node%n.%N.log" in srun and f"--nodes={nodes}" in srun
    assert not (tmp / "logs").exists()                         # a dry run writes nothing


@pytest.mark.parametrize("recipe", sorted(TOO_SMALL))
def test_dry_run_refuses_a_too_small_cluster_with_the_reason(recipe, tmp_path):
    nodes, gib, reason = TOO_SMALL[recipe]
    proc = dry_run(recipe, nodes, tmp_path, gpu_gib=gib)
    assert proc.returncode == 1
    assert "REJECTED" in proc.stdout and reason in proc.stdout, proc.stdout
    assert "what would fit (one change each)" in proc.stdout
    assert "the planner refused (exit 1: the layout does not fit" in proc.stdout
    assert "nothing was launched" in proc.stdout
    assert "== step" not in proc.stdout


def test_dry_run_refuses_a_world_size_the_layout_cannot_split(tmp_path):
    proc = dry_run("llama3.3-70b", 2, tmp_path)
    assert proc.returncode == 1
    assert ("world size 16 (training GPUs) is not a multiple of parallel.tensor x parallel.pipeline x "
            "parallel.context = 8 x 4 x 1 = 32: use 4 or 8 or 12 or 16 nodes") in proc.stdout


def test_environment_overrides_reach_the_planner_and_every_node(tmp_path):
    ckpt = converted(tmp_path / "converted", "Qwen2.5-7B")   # a finished conversion: the step is skipped
    proc = dry_run("qwen2.5-7b", 1, tmp_path, CKPT_DIR=str(ckpt), RUN_DIR="/scratch/run1",
                   EXTRA_OVERRIDES="train.lr=2e-6 train.steps=7", SLURM_RESTART_COUNT="2")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    want = [f"model.checkpoint={ckpt}", "run_dir=/scratch/run1", "train.lr=2e-6", "train.steps=7"]
    plan_cmd = shlex.split([x for x in out.splitlines() if x.startswith("== plan: ")][0][len("== plan: "):])
    assert plan_cmd[-4:] == want
    assert step_lines(out, "train")[0][2][-4:] == want
    assert f"step convert: skipped ({ckpt} already holds a converted checkpoint)" in out
    assert f"logs: {tmp_path}/logs/4242/restart2" in out
    assert "/scratch/run1" in [x for x in out.splitlines() if x.startswith("requeue: ")][0]   # the run dir reached it


def test_what_srun_executes_is_what_the_dry_run_printed(tmp_path):
    """A real (non-dry) launch with srun and torchrun faked: srun runs `launch.sh node` once per node of its
    --nodelist with SLURM's per-task variables; the fake torchrun prints its arguments (and a digest of the
    per-job control-channel secret it was given)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do [[ $1 == --nodelist=* ]] && list=${1#--nodelist=}; shift; done\n"
        "IFS=, read -ra hs <<< \"$list\"\n"
        "for i in \"${!hs[@]}\"; do SLURMD_NODENAME=${hs[$i]} SLURM_NODEID=$i \"$@\"; done\n")
    # the fake torchrun also reports a digest of the control-channel secret it received (never the secret)
    (bin_dir / "torchrun").write_text(
        "#!/bin/bash\nprintf 'RAN %s\\n' \"$(printf '%q ' torchrun \"$@\")\"\n"
        "printf 'SECRET %s %s\\n' \"${#MEGATRON_RL_SECRET}\" \"$(printf %s \"$MEGATRON_RL_SECRET\" | sha256sum | cut -c1-16)\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    ckpt = converted(tmp_path / "converted", "Qwen2.5-32B")
    common = dict(CKPT_DIR=str(ckpt), EXTRA_OVERRIDES="data.train_path=/data/with\\ space.jsonl",
                  MASTER_PORT="31000")
    dry = dry_run("qwen2.5-32b", 4, tmp_path, **common)
    # GPUS_PER_NODE: this CPU box would otherwise be detected as a CPU node (tests/test_launch_slurm.py)
    real = dry_run("qwen2.5-32b", 4, tmp_path, DRY_RUN="", PATH=f"{bin_dir}:{os.environ['PATH']}",
                   GPUS_PER_NODE="8", **common)
    assert dry.returncode == 0 and real.returncode == 0, real.stdout + real.stderr
    printed = [" ".join(shlex.quote(a) for a in argv) for _, _, argv in step_lines(dry.stdout, "train")]
    ran = [" ".join(shlex.quote(a) for a in shlex.split(x[4:])) for x in real.stdout.splitlines() if x.startswith("RAN ")]
    assert len(printed) == 4 and ran == printed
    assert "--node-rank=3" in ran[3] and "data.train_path=/data/with space.jsonl" in shlex.split(ran[0])
    log_dir = tmp_path / "logs" / "4242" / "restart0"
    assert "ACCEPTED" in (log_dir / "plan.txt").read_text() and (log_dir / "plan.env").is_file()
    # one per-job secret (64 hex chars) reached every node's step; the launcher never prints it
    secrets = {x for x in real.stdout.splitlines() if x.startswith("SECRET ")}
    assert len(secrets) == 1 and next(iter(secrets)).split()[1] == "64", secrets
    assert "MEGATRON_RL_SECRET=" not in real.stdout + real.stderr


def test_nodelist_expansion_without_scontrol():
    script = (f"source {shlex.quote(str(LAUNCH))}; FORCE_NODELIST_PARSER=1 expand_nodelist "
              "'gpu[001-003,010],login1,r[1-2]n[08-09]'")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30).stdout.split()
    assert out == ["gpu001", "gpu002", "gpu003", "gpu010", "login1", "r1n08", "r1n09", "r2n08", "r2n09"]

