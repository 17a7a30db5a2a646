#!/bin/bash
#SBATCH --job-name=gv-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
# Stage 1: prompts, questions and real-caption pairs; with --engine=transformers each process runs a share of the LLM calls.
#   sbatch slurm/stage1.sh [--num_per_dimension=200 ...]   (from the repository root)
#   sbatch --gpus-per-node=0 slurm/stage1.sh --engine=openai   (template and openai engines need no GPU)
#   PRESET=tiny bash slurm/stage1.sh        (no SLURM: runs on this machine)
# Settings: PRESET, RUN_DIR, PYTHON, NPROC_PER_NODE (see slurm/_common.sh). Extra arguments go to stage1_prompts/generate.py.
if [ -n "${SLURM_JOB_ID:-}" ]; then REPO=${GIGAVIDEO_REPO:-$SLURM_SUBMIT_DIR}; else REPO=$(cd "$(dirname "$0")/.." && pwd); fi
source "$REPO/slurm/_common.sh"
launch stage1_prompts/generate.py "$@"
