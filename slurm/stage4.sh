#!/bin/bash
#SBATCH --job-name=gv-stage4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
# Stage 4: reward-weighted fine-tuning with DeepSpeed. Resumes from the newest checkpoint in RUN_DIR.
#   sbatch slurm/stage4.sh [--lr=1e-6 ...]            (from the repository root; PRESET, RUN_DIR as below)
#   sbatch --nodes=4 slurm/stage4.sh                  (multi-node: one torchrun per node)
#   PRESET=tiny bash slurm/stage4.sh                  (no SLURM: runs on this machine)
# Settings: see slurm/_common.sh. Extra arguments go to stage4_train/train.py.
if [ -n "${SLURM_JOB_ID:-}" ]; then REPO=${GIGAVIDEO_REPO:-$SLURM_SUBMIT_DIR}; else REPO=$(cd "$(dirname "$0")/.." && pwd); fi
source "$REPO/slurm/_common.sh"
launch stage4_train/train.py "$@"
