#!/bin/bash
#SBATCH --job-name=gv-stage4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
# Stage 4: reward-weighted fine-tuning with DeepSpeed. Resumes from the newest checkpoint in RUN_DIR.
#   sbatch slurm/stage4.sh [--lr=1e-6 --mode=lora ...]   (from the repository root; PRESET, RUN_DIR as below)
#   sbatch --nodes=4 slurm/stage4.sh                      (multi-node: one torchrun per node, N nodes x G GPUs)
#   PRESET=tiny bash slurm/stage4.sh                      (no SLURM: runs on this machine)
# Preemption: SLURM sends USR1 180 s before the time limit (or scancel --batch --signal=USR1 JOBID), and
# SIGTERM on preemption, scancel --signal=TERM or a node drain (then SIGKILL after KillWait / GraceTime:
# see docs/slurm.md). Either way the trainer checkpoints at the end of its step, exits and leaves the stop
# file; the job then requeues itself and resumes.
# Multi-node on GPUs: NCCL picks the fastest transport; set NCCL_SOCKET_IFNAME (e.g. ib0 or eth0) and
# NCCL_IB_HCA where nodes have several interfaces, NCCL_DEBUG=WARN to see what it chose.
# Settings: see slurm/_common.sh. Extra arguments go to stage4_train/train.py.
if [ -n "${SLURM_JOB_ID:-}" ]; then REPO=${GIGAVIDEO_REPO:-$SLURM_SUBMIT_DIR}; else REPO=$(cd "$(dirname "$0")/.." && pwd); fi
source "$REPO/slurm/_common.sh"

stop_file="$RUN_DIR/stage4/stop-request"
preempted=""
on_warning() {
  echo "stage4.sh: preemption warning: asking the trainer to checkpoint and stop"
  mkdir -p "$(dirname "$stop_file")" && touch "$stop_file"
  preempted=1
}
trap on_warning USR1 TERM

launch stage4_train/train.py "$@" &
pid=$!
status=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" && status=0 || status=$?   # a trapped signal interrupts wait; wait again
done
# The trainer leaves the stop file when it stopped on a signal it received itself (srun delivers SIGTERM to
# the job's tasks), as when this script asked it to.
if { [ -n "$preempted" ] || [ -f "$stop_file" ]; } && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "stage4.sh: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
