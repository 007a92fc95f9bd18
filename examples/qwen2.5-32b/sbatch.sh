#!/bin/bash
#SBATCH --job-name=mrl-qwen2.5-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# RLVR with DPPO: Qwen2.5-32B-Instruct on four 8-GPU nodes. Settings: examples/qwen2.5-32b/config.yaml.
#   sbatch examples/qwen2.5-32b/sbatch.sh                 submit from the repository root
#   DRY_RUN=1 bash examples/qwen2.5-32b/sbatch.sh         print every node's commands, run nothing
# Environment overrides: see examples/common/launch.sh. Per-job logs: logs/<job id>/restart<k>/.
# --requeue + --signal: 5 minutes before the time limit the job requeues itself and the RL loop
# resumes from its newest checkpoint in run_dir (checkpoint.resume: true).
set -euo pipefail
# sbatch runs a spool copy of this file: find the repository from REPO_DIR, this file, or the submit dir
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z ${REPO_DIR:-} ]]; then
  if [[ -f $here/../common/launch.sh ]]; then REPO_DIR=$(cd "$here/../.." && pwd); else REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}; fi
fi
source "$REPO_DIR/examples/common/launch.sh"
launch_recipe "$REPO_DIR/examples/qwen2.5-32b"
