#!/bin/bash
#SBATCH --job-name=mrl-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# The tiny CPU job (examples/tiny_cpu/config.yaml, what `megatron-rl demo` runs) through the whole SLURM launch
# path (planner, srun, torchrun, STOP / requeue on the time-limit signal) on any SLURM node, no GPU needed:
#   sbatch examples/tiny_cpu/sbatch.sh                 from anywhere (the repository is found: see below)
#   DRY_RUN=1 bash examples/tiny_cpu/sbatch.sh         print every node's commands, run nothing
# No --gpus-per-node: the launcher runs the CPU backend, CPU_RANKS_PER_NODE ranks (1) of cores / ranks threads.
# The tiny model and its data are built offline on first use (prepare_demo, ~1 min on 2 cores; cached under
# runs/demo/demo) unless HF_DIR and DATA point at them. It is built in a dry run too: the planner reads its
# config.json. PYTHON is the environment's python (default: the repository's .venv when it has one).
set -euo pipefail
# Where the repository is: sbatch runs a spool copy of this file (its own path says nothing), so: REPO_DIR if
# set (sbatch --export=ALL,REPO_DIR=/path/to/repo), else the submitted script's path (`scontrol show job`:
# Command=, what `sbatch examples/x/sbatch.sh` was given, from wherever), else this file's own path (dry runs).
# The recipe directory is the submitted script's: a recipe kept outside the repository needs REPO_DIR.
self=${BASH_SOURCE[0]}
if [[ -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null 2>&1; then
  submitted=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
  [[ -n $submitted && -f $submitted ]] && self=$submitted
fi
here=$(cd "$(dirname "$self")" && pwd)
REPO_DIR=${REPO_DIR:-$(cd "$here/../.." && pwd)}
if [[ ! -f $REPO_DIR/examples/common/launch.sh ]]; then
  echo "launch: error: $REPO_DIR is not the megatron_rl repository (recipe $here): submit with" \
       "sbatch --export=ALL,REPO_DIR=/path/to/megatron_rl $self" >&2
  exit 1
fi
source "$REPO_DIR/examples/common/launch.sh"
[[ -n ${PYTHON:-} || ! -x $REPO_DIR/.venv/bin/python ]] || PYTHON=$REPO_DIR/.venv/bin/python
[[ -n ${TORCHRUN:-} || ! -x $REPO_DIR/.venv/bin/torchrun ]] || TORCHRUN=$REPO_DIR/.venv/bin/torchrun
STOP_GRACE_S=${STOP_GRACE_S:-90}   # inside the 120 s warning above
if [[ -z ${HF_DIR:-} ]]; then
  demo_dir=$REPO_DIR/runs/demo/demo
  if [[ ! -f $demo_dir/prepared.json ]]; then
    say "== prepare: the tiny model and data into $demo_dir (once)"
    (cd "$REPO_DIR" && "${PYTHON:-python}" -c 'import sys
from megatron_rl.trainer.demo import prepare_demo
prepare_demo(sys.argv[1])' "$demo_dir") || die "preparing the tiny model failed (above)"
  fi
  HF_DIR=$demo_dir/hf_sft DATA=${DATA:-$demo_dir/data/train.jsonl}
fi
launch_recipe "$here"
