#!/bin/bash
#SBATCH --job-name=gv-rounds
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=00:30:00
# The report across the rounds of `ROUNDS=N bash slurm/pipeline.sh`: RUN_DIR/rounds.{json,md} (docs/toy-and-rounds.md).
# Settings: RUN_DIR, ROUNDS, PRESET, PYTHON (see slurm/_common.sh). Extra arguments go to eval/rounds.py.
if [ -n "${SLURM_JOB_ID:-}" ]; then REPO=${GIGAVIDEO_REPO:-$SLURM_SUBMIT_DIR}; else REPO=$(cd "$(dirname "$0")/.." && pwd); fi
source "$REPO/slurm/_common.sh"
"$PYTHON" eval/rounds.py --run_dir="$RUN_DIR" --config="$PRESET" --rounds="${ROUNDS:?set ROUNDS}" "$@"
