#!/bin/bash
#SBATCH --job-name=gv-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
# Stage 1: prompts, questions and real-caption pairs (CPU; the template engine needs no GPU).
#   sbatch slurm/stage1.sh [--per_dimension=200 ...]   (from the repository root)
#   PRESET=tiny bash slurm/stage1.sh        (no SLURM: runs on this machine)
# Settings: PRESET, RUN_DIR, PYTHON, NPROC_PER_NODE (see slurm/_common.sh). Extra arguments go to stage1_prompts/generate.py.
if [ -n "${SLURM_JOB_ID:-}" ]; then REPO=${GIGAVIDEO_REPO:-$SLURM_SUBMIT_DIR}; else REPO=$(cd "$(dirname "$0")/.." && pwd); fi
source "$REPO/slurm/_common.sh"
"$PYTHON" stage1_prompts/generate.py --run_dir="$RUN_DIR" --config="$PRESET" "$@"
