#!/bin/bash
# Shared SLURM launcher of the recipes (examples/<recipe>/sbatch.sh source it and call launch_recipe).
#
#   launch_recipe RECIPE_DIR    plan -> convert (once) -> RL job, one torchrun per node through srun
#   bash launch.sh node         inside srun: build this node's torchrun command and exec it
#   bash launch.sh engine-node  inside srun (disaggregated placement): this node's engine servers
#
# Placement (rollout.placement in the config): colocated runs the learner and its engine on every node.
# disaggregated (rollout.engine_nodes: E in the config) runs the learner on
# the first N - E nodes and vLLM engine servers on the last E nodes: GPUS_PER_NODE / rollout.engine_
# tensor_parallel engines per node (megatron_rl.rollout.remote node). The learner's rank 0 hosts their
# rendezvous at <first node>:MASTER_PORT+2; MRL_ENGINE_RENDEZVOUS and MRL_NUM_ENGINES are exported to
# the train step (RemoteConfig.from_env). The engine step is stopped when this script exits.
#
# Settings live in the recipe's config.yaml; the environment only overrides (all optional):
#   DRY_RUN=1          print the exact command of every node instead of running anything
#   CONFIG             config file (default RECIPE_DIR/config.yaml)
#   HF_DIR CKPT_DIR RUN_DIR DATA   -> model.hf_path, model.checkpoint, run_dir, data.train_path
#   EXTRA_OVERRIDES    more key=value config overrides (space separated; "\ " for a space in a value)
#   GPUS_PER_NODE  ranks per node (SLURM_GPUS_ON_NODE, else the node's GPUs: nvidia-smi / torch; a dry run
#                  takes the recipe's #SBATCH --gpus-per-node); a node without a GPU runs the CPU backend with
#                  CPU_RANKS_PER_NODE ranks (1) of cores / ranks threads   GPU_MEMORY_GIB (nvidia-smi, else 80;
#                  CPU: host memory / ranks)   BACKEND (gpu | cpu: what the detection found)
#   PLAN_ARGS          extra planner flags (e.g. --reserve-gib 4); a flag that differs from a config key (e.g.
#                      --recompute) is refused: set train.recompute etc. in the config or EXTRA_OVERRIDES   SKIP_CONVERT=1
#   LOG_ROOT (REPO_DIR/logs)  MASTER_PORT  PYTHON (python)  TORCHRUN (torchrun)  SRUN_ARGS  MAX_REQUEUES (10)
#   STOP_GRACE_S (240): on the time-limit warning, how long the RL loop gets to checkpoint before the requeue
#   FAIL_TAIL_LINES (40): lines of the failing rank's log printed into the job output when a step fails
# The repository is where this file lives (REPO_DIR): a recipe may live anywhere (docs/slurm.md).
# Dry runs also take the SLURM variables from the environment (SLURM_JOB_ID, SLURM_NNODES,
# SLURM_JOB_NODELIST, SLURM_RESTART_COUNT), so tests can fake an allocation.

set -euo pipefail
LAUNCH_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/launch.sh
# the repository this launcher belongs to: the conversion tool and the package run from here, wherever the
# recipe (config, sbatch script) is kept
REPO_DIR=$(cd "$(dirname "$LAUNCH_LIB")/../.." && pwd)

say() { printf '%s\n' "$*"; }
die() { printf 'launch: error: %s\n' "$*" >&2; exit 1; }

# One host per line from a SLURM node list ("gpu[001-003,7],login1"): scontrol when the cluster has it,
# else the same expansion here (dry runs, tests).
expand_nodelist() {
  if [[ -z ${FORCE_NODELIST_PARSER:-} ]] && command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1"
    return
  fi
  local list=$1 item="" depth=0 c i
  local -a items=()
  for ((i = 0; i < ${#list}; i++)); do   # split on the commas outside brackets
    c=${list:i:1}
    case $c in
      "[") depth=$((depth + 1)); item+=$c ;;
      "]") depth=$((depth - 1)); item+=$c ;;
      ",") if ((depth == 0)); then items+=("$item"); item=""; else item+=$c; fi ;;
      *) item+=$c ;;
    esac
  done
  [[ -n $item ]] && items+=("$item")
  for item in "${items[@]}"; do _expand_item "$item"; done
}

_expand_item() {   # one "prefix[ranges]rest" item; rest may hold another bracket group
  local item=$1 prefix ranges rest r lo hi n
  if [[ ! $item =~ ^([^[]*)\[([^]]*)\](.*)$ ]]; then
    printf '%s\n' "$item"
    return
  fi
  prefix=${BASH_REMATCH[1]} ranges=${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
  local -a parts
  IFS=, read -ra parts <<< "$ranges"
  for r in "${parts[@]}"; do
    lo=${r%-*} hi=${r#*-}
    for ((n = 10#$lo; n <= 10#$hi; n++)); do   # keep the zero padding of the range's first bound
      _expand_item "$(printf '%s%0*d%s' "$prefix" "${#lo}" "$n" "$rest")"
    done
  done
}

# NODE_CMD = this node's torchrun command for the current step (same function for dry and real runs,
# so what a dry run prints is what srun executes).
# Every rank's output also goes to its own files (--log-dir + --tee=3: STEP_RANK_LOGS/node<k>/<run>/attempt_<n>/
# <local rank>/stderr.log) so a failed step can print the failing rank's last lines (report_step_failure).
build_node_cmd() {
  local rank=$1
  NODE_CMD=("$TORCHRUN" "--nnodes=$STEP_NNODES" "--nproc-per-node=$STEP_NPROC" "--node-rank=$rank"
            "--master-addr=$STEP_MASTER" "--master-port=$STEP_PORT" "--log-dir=$STEP_RANK_LOGS/node$rank" --tee=3
            "${STEP_CMD[@]}")
}

# build_srun NAME MODE HOSTS...: SRUN_CMD = one task per host running `launch.sh MODE` there (node | engine-node),
# its output in LOG_DIR/NAME.node<k>.<host>.log; SRUN_NODELIST = the hosts, comma separated
build_srun() {
  local name=$1 mode=$2
  shift 2
  SRUN_NODELIST=$(IFS=,; echo "$*")
  SRUN_CMD=(srun "--nodes=$#" "--ntasks=$#" --ntasks-per-node=1 "--nodelist=$SRUN_NODELIST" --kill-on-bad-exit=1
            "--output=$LOG_DIR/$name.node%n.%N.log")
  # shellcheck disable=SC2206
  [[ -n ${SRUN_ARGS:-} ]] && SRUN_CMD+=($SRUN_ARGS)
  SRUN_CMD+=(bash "$LAUNCH_LIB" "$mode")
}

# run_step NAME NNODES NPROC PORT CMD...: CMD under torchrun on the first NNODES nodes of the job.
run_step() {
  local name=$1 i
  STEP_NNODES=$2 STEP_NPROC=$3 STEP_PORT=$4
  shift 4
  STEP_CMD=("$@")
  STEP_HOSTS=("${HOSTS[@]:0:STEP_NNODES}")
  STEP_MASTER=${STEP_HOSTS[0]}   # rendezvous on the step's first node
  STEP_RANK_LOGS=$LOG_DIR/ranks/$name
  build_srun "$name" node "${STEP_HOSTS[@]}"
  local nodelist=$SRUN_NODELIST
  local -a srun_cmd=("${SRUN_CMD[@]}")
  if [[ -n ${DRY_RUN:-} ]]; then
    say "== step $name: $(printf '%q ' "${srun_cmd[@]}")"
    for i in "${!STEP_HOSTS[@]}"; do
      build_node_cmd "$i"
      say "node $i ${STEP_HOSTS[$i]}: $(printf '%q ' "${NODE_CMD[@]}")"
    done
    return
  fi
  say "== step $name on $nodelist (logs: $LOG_DIR/$name.node*.log; per rank: $STEP_RANK_LOGS)"
  STEP_CMD_Q=$(printf '%q ' "${STEP_CMD[@]}") STEP_HOSTS_Q="${STEP_HOSTS[*]}" STEP_NAME=$name
  STEP_STOP_FILE=$([[ $name == train ]] && echo "${PLAN_RUN_DIR:-}/STOP" || true)
  export STEP_NNODES STEP_NPROC STEP_PORT STEP_MASTER STEP_CMD_Q STEP_HOSTS_Q STEP_RANK_LOGS STEP_NAME \
    STEP_STOP_FILE TORCHRUN
  # in the background so the requeue trap can run while we wait (bash defers traps during a foreground job)
  "${srun_cmd[@]}" &
  STEP_PID=$!
  local rc=0
  wait $STEP_PID || rc=$?
  STEP_PID="" STEP_RC=$rc
  if ((rc != 0)); then
    report_step_failure "$name" "$rc"
    exit "$rc"
  fi
}

# ---- inside srun: one task per node ------------------------------------------------------------------------
# torchrun does not handle SIGUSR1 (its default action kills it, and with it the step, without a checkpoint),
# and `scancel --signal=USR1 JOB` signals the steps' processes, not the batch shell. So torchrun (and the ranks
# until the RL loop's StopRequest installs its handler) run with SIGUSR1 ignored, and this wrapper turns the
# signal into run_dir/STOP, which the loop also reads (the ranks that get the signal directly see it too).
_node_main() {
  local -a hosts
  read -ra hosts <<< "$STEP_HOSTS_Q"
  eval "STEP_CMD=($STEP_CMD_Q)"
  local rank=${SLURM_NODEID:-0} i
  for i in "${!hosts[@]}"; do   # the step's own order, whatever SLURM numbers this node in the job
    [[ ${hosts[$i]} == "${SLURMD_NODENAME:-}" ]] && rank=$i
  done
  build_node_cmd "$rank"
  # a STOP file older than this is a previous job's (trainer/loop.py StopRequest): one written after it is live
  export MRL_STOP_SINCE=${MRL_STOP_SINCE:-$(date +%s)}
  trap _node_on_usr1 USR1
  trap 'kill -TERM "$NODE_PID" 2>/dev/null' TERM INT
  (trap '' USR1; exec "${NODE_CMD[@]}") &
  NODE_PID=$!
  local rc
  while true; do   # a trapped signal interrupts wait (status > 128) while torchrun still runs: wait again
    rc=0
    wait "$NODE_PID" || rc=$?
    kill -0 "$NODE_PID" 2>/dev/null || break
  done
  # the batch script looks for this line (report_step_failure): which node failed, with what
  ((rc == 0)) || say "launch: node $rank (${SLURMD_NODENAME:-$(hostname)}) of step $STEP_NAME: torchrun exited with $rc"
  exit "$rc"
}

_node_on_usr1() {
  if [[ -n ${STEP_STOP_FILE:-} && $STEP_STOP_FILE != /STOP ]]; then
    mkdir -p "$(dirname "$STEP_STOP_FILE")" && touch "$STEP_STOP_FILE"
    say "launch: SIGUSR1: asked the RL loop to checkpoint and stop ($STEP_STOP_FILE)"
  else   # the conversion: its output is atomic, so it just goes on (a requeued job redoes it)
    say "launch: SIGUSR1 during step $STEP_NAME: ignored (only the train step checkpoints on request)"
  fi
}

# ---- a failed step: which rank, on which host, and its last lines, into the job output ----------------------
# torchrun's "Root Cause (first observed failure)" block names the rank, its host and local rank; the rank's own
# file is STEP_RANK_LOGS/node<k>/*/attempt_*/<local rank>/stderr.log. Without the block (torchrun itself died,
# a node was lost), the wrapper's "torchrun exited with" line names the node and its log's tail is printed.
report_step_failure() {
  local name=$1 rc=$2 n=${FAIL_TAIL_LINES:-40} f block rank local_rank host node file found=""
  say "launch: step $name failed (srun exit $rc)"
  for f in "$LOG_DIR/$name".node*.log; do
    [[ -f $f ]] || continue
    block=$(awk '/Root Cause \(first observed failure\)/ {p = 1} p {print} p && /^=+$/ {exit}' "$f")
    if [[ -n $block ]]; then
      found=1
      rank=$(sed -n 's/^ *rank *: *\([0-9]*\).*/\1/p' <<< "$block" | head -n1)
      local_rank=$(sed -n 's/.*local_rank: *\([0-9]*\).*/\1/p' <<< "$block" | head -n1)
      host=$(sed -n 's/^ *host *: *\(.*\)$/\1/p' <<< "$block" | head -n1)
      node=$(sed -n 's/.*\.node\([0-9]*\)\..*/\1/p' <<< "${f##*/}")
      say "launch: failing rank $rank (local rank $local_rank) on host $host (node $node; log $f):"
      printf '%s\n' "$block"
      file=$(ls -t "$STEP_RANK_LOGS/node$node"/*/attempt_*/"$local_rank"/stderr.log 2>/dev/null | head -n1 || true)
      if [[ -n $file && -s $file ]]; then
        say "launch: last $n lines of rank $rank's stderr ($file):"
        tail -n "$n" "$file"
      fi
      break   # the first observed failure; the other nodes' ranks were stopped because of it
    fi
  done
  [[ -n $found ]] && return 0
  for f in "$LOG_DIR/$name".node*.log; do
    [[ -f $f ]] && grep -q '^launch: node .* torchrun exited with' "$f" || continue
    found=1
    grep '^launch: node .* torchrun exited with' "$f"
    say "launch: last $n lines of $f:"
    tail -n "$n" "$f"
  done
  [[ -n $found ]] || say "launch: no node log names the failure (srun's own error is above; logs: $LOG_DIR)"
}

# ---- disaggregated placement: the engine servers ------------------------------------------------------
# ENGINE_CMD = engine node J's command (same function for dry and real runs)
build_engine_cmd() {
  ENGINE_CMD=("$PYTHON" -m megatron_rl.rollout.remote node --rendezvous "$ENGINE_RDZV" --num-engines "$ENGINE_NUM"
              --node-index "$1" --engines-per-node "$ENGINE_PER_NODE" --gpus-per-engine "$ENGINE_TP")
}

# start_engines CONFIG GPUS PORT OVERRIDES...: engine servers on the nodes after the training nodes, in the
# background (they wait for the learner; they exit when it disconnects)
start_engines() {
  local config=$1 gpus=$2 port=$3 i
  shift 3
  local engine_nodes=$((${#HOSTS[@]} - PLAN_TRAIN_NODES))
  ((engine_nodes > 0)) || die "rollout.placement is disaggregated but no node is left for the engines (set \
rollout.engine_nodes in the config)"
  # engine TP from the config (with the same overrides), unless ENGINE_TP says it
  ENGINE_TP=${ENGINE_TP:-$("$PYTHON" -c 'import sys
from megatron_rl.trainer.config import load_rl_config
print(load_rl_config(sys.argv[1], sys.argv[2:]).rollout.engine_tensor_parallel)' "$config" "$@")}
  ((gpus % ENGINE_TP == 0)) || die "GPUs per node ($gpus) is not a multiple of the engine TP size ($ENGINE_TP)"
  ENGINE_PER_NODE=$((gpus / ENGINE_TP)) ENGINE_NUM=$((engine_nodes * gpus / ENGINE_TP))
  ENGINE_RDZV=${HOSTS[0]}:$port   # the learner's global rank 0 runs on the first training node
  ENGINE_HOSTS=("${HOSTS[@]:PLAN_TRAIN_NODES}")
  export MRL_ENGINE_RENDEZVOUS=$ENGINE_RDZV MRL_NUM_ENGINES=$ENGINE_NUM
  build_srun engines engine-node "${ENGINE_HOSTS[@]}"
  local nodelist=$SRUN_NODELIST
  local -a srun_cmd=("${SRUN_CMD[@]}")
  say "engines: $ENGINE_NUM x TP $ENGINE_TP on ${ENGINE_HOSTS[*]}; to the train step:" \
      "MRL_ENGINE_RENDEZVOUS=$ENGINE_RDZV MRL_NUM_ENGINES=$ENGINE_NUM"
  if [[ -n ${DRY_RUN:-} ]]; then
    say "== step engines: $(printf '%q ' "${srun_cmd[@]}")"
    for i in "${!ENGINE_HOSTS[@]}"; do
      build_engine_cmd "$i"
      say "node $i ${ENGINE_HOSTS[$i]}: $(printf '%q ' "${ENGINE_CMD[@]}")"
    done
    return
  fi
  say "== step engines on $nodelist (logs: $LOG_DIR/engines.node*.log)"
  ENGINE_HOSTS_Q="${ENGINE_HOSTS[*]}"
  export ENGINE_RDZV ENGINE_NUM ENGINE_PER_NODE ENGINE_TP ENGINE_HOSTS_Q PYTHON
  "${srun_cmd[@]}" &
  ENGINES_PID=$!
  trap _stop_engines EXIT
}

_stop_engines() {   # they exit by themselves once the learner is gone; give them a minute, then stop them
  local t
  [[ -n ${ENGINES_PID:-} ]] || return 0
  for ((t = 0; t < 60; t++)); do
    kill -0 "$ENGINES_PID" 2>/dev/null || return 0
    sleep 1
  done
  kill "$ENGINES_PID" 2>/dev/null || true
}

_engine_node_main() {   # inside srun: one task per engine node
  local -a hosts
  read -ra hosts <<< "$ENGINE_HOSTS_Q"
  local j=${SLURM_NODEID:-0} i
  for i in "${!hosts[@]}"; do
    [[ ${hosts[$i]} == "${SLURMD_NODENAME:-}" ]] && j=$i
  done
  build_engine_cmd "$j"
  exec "${ENGINE_CMD[@]}"
}

# ---- what this node is: sets BACKEND, NODE_RANKS (torchrun --nproc-per-node of the train step), NODE_MEM_GIB
# (per rank), NODE_THREADS (OMP_NUM_THREADS) and NODE_SOURCE (how it was decided, for the job output).
# PYTHON must import torch and megatron_rl: checked first, dry runs included, and its own error is shown (a
# missing package would otherwise surface as the planner's exit 1, which means "does not fit").
# Order: GPUS_PER_NODE (and BACKEND) as set > dry run: the recipe's #SBATCH --gpus-per-node (none: CPU) >
# SLURM_GPUS_ON_NODE > the GPUs this node has (nvidia-smi -L, else torch) > none: the CPU backend.
detect_node() {
  local stated_gpus=$1 cores probe err count=0 torch_gib=""
  cores=${SLURM_CPUS_ON_NODE:-$(nproc 2>/dev/null || echo 1)}
  err=$(mktemp)
  if ! probe=$("$PYTHON" -c 'import torch, megatron_rl
n = torch.cuda.device_count()
print(n, round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if n else "")' 2>"$err"); then
    local msg
    msg=$(tail -n 5 "$err")
    rm -f "$err"
    die "PYTHON=$PYTHON cannot import torch and megatron_rl (set PYTHON to the environment's python, e.g. \
$REPO_DIR/.venv/bin/python):
$msg"
  fi
  rm -f "$err"
  read -r count torch_gib <<< "$probe"
  BACKEND=${BACKEND:-}
  if [[ -n ${GPUS_PER_NODE:-} ]]; then
    NODE_RANKS=$GPUS_PER_NODE NODE_SOURCE="GPUS_PER_NODE" BACKEND=${BACKEND:-gpu}
  elif [[ $BACKEND == cpu ]]; then
    NODE_RANKS=${CPU_RANKS_PER_NODE:-1} NODE_SOURCE="BACKEND=cpu"
  elif [[ -n ${DRY_RUN:-} ]]; then   # a dry run plans the recipe's cluster, not the machine it runs on
    if [[ -n $stated_gpus ]]; then
      NODE_RANKS=$stated_gpus NODE_SOURCE="the recipe's #SBATCH --gpus-per-node" BACKEND=gpu
    else
      NODE_RANKS=${CPU_RANKS_PER_NODE:-1} NODE_SOURCE="the recipe asks for no GPU" BACKEND=cpu
    fi
  elif [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE:-0} != 0 ]]; then
    NODE_RANKS=$SLURM_GPUS_ON_NODE NODE_SOURCE="SLURM_GPUS_ON_NODE" BACKEND=gpu
  else
    local smi=0
    command -v nvidia-smi >/dev/null 2>&1 && smi=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if ((smi > 0 || count > 0)); then
      NODE_RANKS=$((smi > 0 ? smi : count)) NODE_SOURCE="this node's GPUs" BACKEND=gpu
    else
      NODE_RANKS=${CPU_RANKS_PER_NODE:-1} BACKEND=cpu
      NODE_SOURCE="no GPU on this node (nvidia-smi: none, torch.cuda.device_count() = $count); to plan GPUs set \
GPUS_PER_NODE and GPU_MEMORY_GIB"
    fi
  fi
  NODE_THREADS=$((cores / NODE_RANKS > 0 ? cores / NODE_RANKS : 1))
  NODE_MEM_GIB=${GPU_MEMORY_GIB:-}
  if [[ $BACKEND == gpu ]]; then
    ((NODE_THREADS <= 8)) || NODE_THREADS=8
    if [[ -z $NODE_MEM_GIB && -z ${DRY_RUN:-} ]] && command -v nvidia-smi >/dev/null 2>&1; then
      NODE_MEM_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 2>/dev/null |
                     awk '{printf "%.1f", $1 / 1024}' || true)
    fi
    [[ -n $NODE_MEM_GIB || -n ${DRY_RUN:-} ]] || NODE_MEM_GIB=$torch_gib
    NODE_MEM_GIB=${NODE_MEM_GIB:-80}
  elif [[ -z $NODE_MEM_GIB ]]; then   # CPU: the job's host memory (SLURM_MEM_PER_NODE, MB), else the node's
    local mib=${SLURM_MEM_PER_NODE:-$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo 2>/dev/null || echo 8192)}
    NODE_MEM_GIB=$(awk -v m="$mib" -v r="$NODE_RANKS" 'BEGIN {printf "%.1f", m / 1024 / r}')
  fi
}

# The run is complete when its final HF export exists (the loop writes run_dir/hf_final atomically once the last
# step has trained, checkpoint.export_hf), or when the train step exited 0 without being asked to stop (the loop
# only returns early on a stop request). A complete run is not requeued: the restart would have nothing to do.
_run_finished() {
  [[ -n ${PLAN_RUN_DIR:-} && -f $PLAN_RUN_DIR/hf_final/config.json ]] && return 0
  [[ ${STEP_NAME:-} == train && ${STEP_RC:-} == 0 && -z ${STOP_ASKED:-} ]]
}

# Requeue allowed? `sbatch --no-requeue` (or JobRequeue=0 in slurm.conf) makes `scontrol requeue` fail; scontrol
# shows it as Requeue=0. MAX_REQUEUES=0 turns it off from here. Never fails the job: a refused requeue is said.
_requeue() {
  if ((RESTART >= ${MAX_REQUEUES:-10})); then
    say "launch: time limit near and MAX_REQUEUES=${MAX_REQUEUES:-10} reached: not requeueing"
    return 0
  fi
  if scontrol show job "$JOB_ID" 2>/dev/null | grep -qw 'Requeue=0'; then
    say "launch: time limit near: job $JOB_ID was submitted without requeue (--no-requeue): not requeueing;" \
        "resubmit it to continue from the newest checkpoint"
    return 0
  fi
  say "launch: requeueing job $JOB_ID (restart $((RESTART + 1)))"
  scontrol requeue "$JOB_ID" || say "launch: scontrol requeue $JOB_ID was refused (see above): not requeued;" \
    "resubmit the job to continue from the newest checkpoint"
}

_on_timeout() {   # SIGUSR1 from `#SBATCH --signal=B:USR1@300`: checkpoint, then requeue; the loop resumes
  # run_dir/STOP asks the RL loop to checkpoint at the end of its current step and exit (trainer/loop.py);
  # give it STOP_GRACE_S (default 240, inside the 300 s warning), then requeue whatever state it reached
  local grace=${STOP_GRACE_S:-240} t
  # only the train step reads STOP (a conversion is redone from scratch after the requeue: its output is atomic)
  if [[ ${STEP_NAME:-} == train && -n ${PLAN_RUN_DIR:-} && -n ${STEP_PID:-} ]] && kill -0 "$STEP_PID" 2>/dev/null; then
    mkdir -p "$PLAN_RUN_DIR" && touch "$PLAN_RUN_DIR/STOP"
    STOP_ASKED=1
    say "launch: time limit near: asked the RL loop to checkpoint and stop ($PLAN_RUN_DIR/STOP); waiting up to ${grace}s"
    for ((t = 0; t < grace; t++)); do
      kill -0 "$STEP_PID" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$STEP_PID" 2>/dev/null; then
      say "launch: the RL loop did not stop within ${grace}s; requeueing anyway (it resumes from its newest" \
          "complete checkpoint)"
    fi
  fi
  if _run_finished; then
    say "launch: time limit near but the run is complete ($PLAN_RUN_DIR): not requeueing"
  else
    _requeue
  fi
  exit 0
}

launch_recipe() {
  local recipe_dir config
  recipe_dir=$(cd "$1" && pwd) || die "recipe directory $1 does not exist"
  config=${CONFIG:-$recipe_dir/config.yaml}
  [[ $config == /* ]] || config=$PWD/$config   # relative to where it was given, before the cd below
  # relative paths in the configs (models/..., checkpoints/..., runs/...) are the repository's
  cd "$REPO_DIR"
  PYTHON=${PYTHON:-python} TORCHRUN=${TORCHRUN:-torchrun}
  [[ -f $config ]] || die "config $config does not exist"
  if [[ -z ${DRY_RUN:-} && -z ${SLURM_JOB_ID:-} ]]; then
    die "not inside a SLURM job: submit with sbatch $recipe_dir/sbatch.sh, or set DRY_RUN=1"
  fi
  # the conversion tool is checked in a dry run too: a dry run fails where the real run would
  [[ -f tools/convert_hf_to_megatron.py ]] || die "$REPO_DIR/tools/convert_hf_to_megatron.py is missing: \
REPO_DIR=$REPO_DIR is not a megatron_rl checkout"
  local stated stated_gpus
  stated=$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "$recipe_dir/sbatch.sh" | head -n1)
  stated_gpus=$(sed -n 's/^#SBATCH --gpus-per-node=\([0-9]*\).*/\1/p' "$recipe_dir/sbatch.sh" | head -n1)
  JOB_ID=${SLURM_JOB_ID:-dryrun} RESTART=${SLURM_RESTART_COUNT:-0}
  local nnodes=${SLURM_NNODES:-${stated:-1}}
  local nodelist=${SLURM_JOB_NODELIST:-node[1-$nnodes]}
  mapfile -t HOSTS < <(expand_nodelist "$nodelist")
  ((${#HOSTS[@]} == nnodes)) || die "SLURM_JOB_NODELIST $nodelist names ${#HOSTS[@]} hosts, SLURM_NNODES is $nnodes"
  detect_node "$stated_gpus"
  local gpus=$NODE_RANKS mem=$NODE_MEM_GIB
  LOG_DIR=${LOG_ROOT:-$REPO_DIR/logs}/$JOB_ID/restart$RESTART
  local port=${MASTER_PORT:-$((20000 + $(cksum <<< "$JOB_ID" | cut -d' ' -f1) % 20000))}

  local -a overrides=()
  [[ -n ${HF_DIR:-} ]] && overrides+=("model.hf_path=$HF_DIR")
  [[ -n ${CKPT_DIR:-} ]] && overrides+=("model.checkpoint=$CKPT_DIR")
  [[ -n ${RUN_DIR:-} ]] && overrides+=("run_dir=$RUN_DIR")
  [[ -n ${DATA:-} ]] && overrides+=("data.train_path=$DATA")
  local -a extra plan_args
  # shellcheck disable=SC2162  # no -r: a backslash-escaped space stays inside one override ("a=x\ y")
  read -a extra <<< "${EXTRA_OVERRIDES:-}"
  read -ra plan_args <<< "${PLAN_ARGS:-}"
  overrides+=(${extra[@]+"${extra[@]}"})

  local unit=GPUs
  [[ $BACKEND == cpu ]] && unit="CPU ranks ($NODE_THREADS threads each)"
  say "job $JOB_ID restart $RESTART: $nnodes nodes (${HOSTS[*]}) x $gpus $unit x $mem GiB; backend $BACKEND" \
      "($NODE_SOURCE); config $config"
  say "logs: $LOG_DIR"
  local plan_env plan_out
  if [[ -n ${DRY_RUN:-} ]]; then
    plan_env=$(mktemp) plan_out=$(mktemp)
  else
    mkdir -p "$LOG_DIR"
    plan_env=$LOG_DIR/plan.env plan_out=$LOG_DIR/plan.txt
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$NODE_THREADS}
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # ---- per-job environment for every step (srun passes the batch environment on) ----
    # the disaggregated control channel's per-job secret (rollout/remote_comm.py: HMAC at connect and on
    # every message): generated once per job unless given, passed by the environment only, never printed
    if [[ -z ${MEGATRON_RL_SECRET:-} ]]; then
      MEGATRON_RL_SECRET=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')
    fi
    export MEGATRON_RL_SECRET
  fi
  # 1. the planner, on this (batch) host: a layout that cannot fit stops here, before any GPU work
  local -a plan_cmd=("$PYTHON" -m megatron_rl.trainer.plan --config "$config" --nodes "$nnodes"
                     --gpus-per-node "$gpus" --gpu-memory "$mem" --backend "$BACKEND" --emit-env "$plan_env"
                     ${plan_args[@]+"${plan_args[@]}"} ${overrides[@]+"${overrides[@]}"})
  say "== plan: $(printf '%q ' "${plan_cmd[@]}")"
  local rc=0
  "${plan_cmd[@]}" 2>&1 | tee "$plan_out" || rc=${PIPESTATUS[0]}
  if ((rc != 0)); then
    # exit 1 is also what a Python crash gives: only a printed REJECTED means "does not fit"
    if ((rc == 1)) && grep -q '^REJECTED' "$plan_out"; then
      say "launch: the planner refused (exit 1: the layout does not fit, see above): nothing was launched"
    elif ((rc == 2)); then
      say "launch: the planner refused (exit 2: bad config or arguments, see above): nothing was launched"
    else
      say "launch: the planner failed (exit $rc: its error is above): nothing was launched"
    fi
    [[ -n ${DRY_RUN:-} ]] && rm -f "$plan_env" "$plan_out"
    exit 1
  fi
  # shellcheck disable=SC1090
  source "$plan_env"
  [[ -n ${DRY_RUN:-} ]] && rm -f "$plan_env" "$plan_out"

  trap _on_timeout USR1
  say "requeue: on SIGUSR1 (sent before the time limit) -> $PLAN_RUN_DIR/STOP (the loop checkpoints and exits), then \
scontrol requeue $JOB_ID (at most ${MAX_REQUEUES:-10} times); checkpoint.resume=$PLAN_RESUME: the loop continues from \
its newest checkpoint"
  [[ $PLAN_RESUME == True ]] || say "warning: checkpoint.resume is false: a requeued job starts over"

  # 2. conversion, once: the output appears atomically, so its metadata file means a finished conversion
  if [[ -n ${SKIP_CONVERT:-} || -z $PLAN_CKPT_DIR ]]; then
    say "== step convert: skipped (SKIP_CONVERT set or no model.checkpoint)"
  elif [[ -f $PLAN_CKPT_DIR/megatron_rl_model.json ]]; then
    say "== step convert: skipped ($PLAN_CKPT_DIR already holds a converted checkpoint)"
  else
    [[ -n $PLAN_HF_DIR ]] || die "model.checkpoint $PLAN_CKPT_DIR does not exist and model.hf_path is empty"
    run_step convert "$PLAN_CONVERT_NODES" "$PLAN_CONVERT_NPROC" "$port" tools/convert_hf_to_megatron.py \
      --hf-dir "$PLAN_HF_DIR" --out "$PLAN_CKPT_DIR" --tp "$PLAN_TP" --pp "$PLAN_PP"
  fi
  # 3. disaggregated: the engine servers on the remaining nodes (background), then the learner
  if [[ $PLAN_PLACEMENT == disaggregated ]]; then
    start_engines "$config" "$gpus" "$((port + 2))" ${overrides[@]+"${overrides[@]}"}
  fi
  # 4. the RL job on every training node
  run_step train "$PLAN_TRAIN_NODES" "$gpus" "$((port + 1))" -m megatron_rl.trainer.cli train \
    --config "$config" ${overrides[@]+"${overrides[@]}"}
}

if [[ ${BASH_SOURCE[0]} == "$0" && ${1:-} == node ]]; then
  _node_main
elif [[ ${BASH_SOURCE[0]} == "$0" && ${1:-} == engine-node ]]; then
  _engine_node_main
fi
