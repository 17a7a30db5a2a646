# Sourced by slurm/*.sh. Settings (environment variables):
#   PRESET          config preset name or TOML path (REQUIRED under sbatch; without SLURM: tiny)
#   RUN_DIR         run directory, on a filesystem every node sees (REQUIRED under sbatch; without SLURM: runs/demo)
#   PYTHON          interpreter (default: .venv/bin/python if present, else python3)
#   NPROC_PER_NODE  processes per node (default: GPUs on the node, or 1 without GPUs)
#   MASTER_PORT     rendezvous port (default: derived from the job id)
#   JUDGE_SERVER    stages 3 and eval: a command serving an OpenAI-compatible judge on --port JUDGE_PORT (e.g.
#                   "vllm serve /models/LLaVA-Video-7B-Qwen2-hf --limit-mm-per-prompt '{\"video\": 1}'"), started
#                   on this node before the stage and stopped after it; the stage is pointed at it
#   JUDGE_PORT      its port (default: derived from the job id); JUDGE_SERVER_WAIT: seconds to wait for it (900)
# Under sbatch, processes start with srun: one torchrun per task (one task per node), joined by a
# c10d rendezvous on the first host of the allocation. Run with plain bash, everything runs here.
set -euo pipefail
cd "$REPO"
# On a cluster the defaults would train random tiny models into the submit folder: refuse them there.
if [ -n "${SLURM_JOB_ID:-}" ] && { [ -z "${PRESET:-}" ] || [ -z "${RUN_DIR:-}" ]; }; then
  echo "error: under sbatch, set PRESET and RUN_DIR (e.g. export PRESET=configs/my-wan.toml" \
    "RUN_DIR=/shared/runs/run1, then sbatch); the defaults (tiny, runs/demo) are for trying it without SLURM" >&2
  exit 2
fi
PRESET=${PRESET:-tiny}
RUN_DIR=${RUN_DIR:-runs/demo}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export PYTHONUNBUFFERED=1

gpus_here() {
  local n=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
  n=${n##*:}  # "gpu:8" -> 8
  if [ -z "$n" ]; then n=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0); fi
  echo "${n:-0}"
}

# array_tasks STAGE: the number of tasks of this stage's job array. A task resubmitted alone
# (sbatch --array=17 ...) keeps the count the array was first submitted with (recorded in RUN_DIR/.locks).
array_tasks() {
  local record="$RUN_DIR/.locks/$1-array-tasks"
  mkdir -p "$(dirname "$record")"
  if [ "${SLURM_ARRAY_TASK_COUNT:-1}" -gt 1 ] || [ ! -s "$record" ]; then
    echo "${SLURM_ARRAY_TASK_COUNT:-1}" > "$record.$$" && mv "$record.$$" "$record"
  fi
  cat "$record"
}

# launch SCRIPT [ARGS...]: the stage script on every process of the job (or of this machine).
# In a job array (sbatch --array=0-63 slurm/stage2.sh), each task is one process, rank SLURM_ARRAY_TASK_ID
# of the array's task count, with no rendezvous: a failed task reruns alone. Stage 4 stays one job.
launch() {
  local script=$1; shift
  local nproc=${NPROC_PER_NODE:-$(gpus_here)}
  [ "$nproc" -ge 1 ] 2>/dev/null || nproc=1
  local args=(--run_dir="$RUN_DIR" --config="$PRESET" "$@")
  if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    local stage; stage=$(basename "$(dirname "$script")"); stage=${stage%%_*}  # stage2_render -> stage2
    if [ "$stage" = stage4 ]; then
      echo "launch: stage 4 trains as one (multi-node) job, not a job array" >&2; return 2
    fi
    local world; world=$(array_tasks "$stage")
    echo "launch: job array $SLURM_ARRAY_JOB_ID, task $SLURM_ARRAY_TASK_ID of $world (no rendezvous)"
    RANK=$SLURM_ARRAY_TASK_ID WORLD_SIZE=$world LOCAL_RANK=0 "$PYTHON" "$script" "${args[@]}"
  elif [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
    local nodes=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
    export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    echo "launch: job $SLURM_JOB_ID, $nodes torchrun agents x $nproc processes, rendezvous $MASTER_ADDR:$MASTER_PORT"
    srun --kill-on-bad-exit=1 --ntasks="$nodes" \
      "$PYTHON" -m gigavideo.launch --nnodes="$nodes" --nproc_per_node="$nproc" \
        --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
        "$script" "${args[@]}"
  elif [ "$nproc" -gt 1 ]; then
    "$PYTHON" -m gigavideo.launch --standalone --nproc_per_node="$nproc" "$script" "${args[@]}"
  else
    "$PYTHON" "$script" "${args[@]}"
  fi
}

# start_judge_server: with JUDGE_SERVER set, start it here (its log in RUN_DIR/logs), wait until it answers
# GET JUDGE_URL/models, and stop it (its whole process group) when this script exits. Sets JUDGE_URL.
start_judge_server() {
  [ -n "${JUDGE_SERVER:-}" ] || return 0
  JUDGE_PORT=${JUDGE_PORT:-$((30000 + ${SLURM_JOB_ID:-$$} % 20000))}
  JUDGE_URL="http://127.0.0.1:$JUDGE_PORT/v1"
  JUDGE_LOG="$RUN_DIR/logs/judge-server-${SLURM_JOB_ID:-$$}.log"
  mkdir -p "$(dirname "$JUDGE_LOG")"
  setsid bash -c "exec $JUDGE_SERVER --port $JUDGE_PORT" > "$JUDGE_LOG" 2>&1 &
  JUDGE_PID=$!
  trap stop_judge_server EXIT
  trap 'exit 143' TERM  # scancel, preemption: exit, so that the EXIT trap stops the server
  local waited=0 limit=${JUDGE_SERVER_WAIT:-900}
  echo "judge server: started (pid $JUDGE_PID, log $JUDGE_LOG); waiting for $JUDGE_URL/models"
  until "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
      "$JUDGE_URL/models" 2>/dev/null; do
    if ! kill -0 "$JUDGE_PID" 2>/dev/null; then
      echo "error: the judge server exited before answering; the end of $JUDGE_LOG:" >&2
      tail -n 20 "$JUDGE_LOG" >&2
      return 2
    fi
    if [ "$waited" -ge "$limit" ]; then
      echo "error: the judge server did not answer $JUDGE_URL/models within ${limit}s (JUDGE_SERVER_WAIT); see $JUDGE_LOG" >&2
      return 2
    fi
    sleep 2; waited=$((waited + 2))
  done
  echo "judge server: answering at $JUDGE_URL after ${waited}s"
}

stop_judge_server() {
  [ -n "${JUDGE_PID:-}" ] || return 0
  kill -TERM -- "-$JUDGE_PID" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$JUDGE_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$JUDGE_PID" 2>/dev/null || true
  echo "judge server: stopped"
  JUDGE_PID=
}
