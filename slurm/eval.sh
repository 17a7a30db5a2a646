#!/bin/bash
#SBATCH --job-name=gv-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
# Eval: baseline vs fine-tuned on held-out and VBench-2.0 prompts, report in RUN_DIR/eval (docs/stages.md: Eval).
#   sbatch slurm/eval.sh [--suites="[heldout,vbench2]" --prompts_per_dimension=50 ...]   (from the repository root)
#   PRESET=tiny bash slurm/eval.sh        (no SLURM: runs on this machine)
# Settings: PRESET, RUN_DIR, PYTHON, NPROC_PER_NODE (see slurm/_common.sh). Extra arguments go to eval/evaluate.py.
if [ -n "${SLURM_JOB_ID:-}" ]; then REPO=${GIGAVIDEO_REPO:-$SLURM_SUBMIT_DIR}; else REPO=$(cd "$(dirname "$0")/.." && pwd); fi
source "$REPO/slurm/_common.sh"
start_judge_server
launch eval/evaluate.py ${JUDGE_URL:+--score.judge_base_url=$JUDGE_URL} "$@"
