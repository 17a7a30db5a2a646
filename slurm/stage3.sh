#!/bin/bash
#SBATCH --job-name=gv-stage3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
# Stage 3: the frozen judge scores every rendered video; distributed and resumable like stage 2.
#   sbatch slurm/stage3.sh [--judge_path=/models/llava ...]   (from the repository root)
#   PRESET=tiny bash slurm/stage3.sh        (no SLURM: runs on this machine)
# Settings: PRESET, RUN_DIR, PYTHON, NPROC_PER_NODE (see slurm/_common.sh). Extra arguments go to stage3_score/score.py.
if [ -n "${SLURM_JOB_ID:-}" ]; then REPO=${GIGAVIDEO_REPO:-$SLURM_SUBMIT_DIR}; else REPO=$(cd "$(dirname "$0")/.." && pwd); fi
source "$REPO/slurm/_common.sh"
start_judge_server
launch stage3_score/score.py ${JUDGE_URL:+--score.judge_base_url=$JUDGE_URL} "$@"
