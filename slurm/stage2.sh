#!/bin/bash
#SBATCH --job-name=gv-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
# Stage 2: render every prompt with the frozen base model; each process takes a disjoint slice and resumes.
#   sbatch slurm/stage2.sh [--model_path=/models/Wan2.1-T2V-1.3B-Diffusers ...]   (from the repository root)
#   PRESET=tiny bash slurm/stage2.sh        (no SLURM: runs on this machine)
# Settings: PRESET, RUN_DIR, PYTHON, NPROC_PER_NODE (see slurm/_common.sh). Extra arguments go to stage2_render/render.py.
if [ -n "${SLURM_JOB_ID:-}" ]; then REPO=${GIGAVIDEO_REPO:-$SLURM_SUBMIT_DIR}; else REPO=$(cd "$(dirname "$0")/.." && pwd); fi
source "$REPO/slurm/_common.sh"
launch stage2_render/render.py "$@"
