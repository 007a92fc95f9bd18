#!/bin/bash
#SBATCH --job-name=mrl-qwen2.5-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# RLVR with DPPO: Qwen2.5-7B-Instruct on one 8-GPU node. Settings: examples/qwen2.5-7b/config.yaml.
#   sbatch examples/qwen2.5-7b/sbatch.sh                 from anywhere (the repository is found: see below)
#   DRY_RUN=1 bash examples/qwen2.5-7b/sbatch.sh         print every node's commands, run nothing
# Environment overrides: see examples/common/launch.sh. Per-job logs: logs/<job id>/restart<k>/.
# --requeue + --signal: 5 minutes before the time limit the job requeues itself and the RL loop
# resumes from its newest checkpoint in run_dir (checkpoint.resume: true).
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
launch_recipe "$here"
