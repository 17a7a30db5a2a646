#!/bin/bash
# The whole pipeline: first the base step here (scripts/prepare_base.py: checks model.path, or builds the
# tiny base, or pre-trains the toy world's), then submits stage1 -> stage2 -> stage3 -> stage4 -> eval
# chained with --dependency=afterok, or, where there is no sbatch or LOCAL=1, runs them here one after another.
#   PRESET=configs/my-wan.toml RUN_DIR=/scratch/gv/run1 bash slurm/pipeline.sh
#   SBATCH_ARGS="--partition=gpu --account=me" bash slurm/pipeline.sh     (extra sbatch options, every stage)
#   LOCAL=1 PRESET=toy RUN_DIR=runs/demo bash slurm/pipeline.sh           (what `make demo` runs)
#   ARRAY_TASKS=64 bash slurm/pipeline.sh    (stages 1-3 and the eval as 64-task job arrays: a failed task
#                                            reruns alone; stage 4 stays one multi-node job)
# Per-stage flags belong in the preset file (e.g. model.path, score.judge_path); see README.md.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
export PRESET=${PRESET:-tiny} RUN_DIR=${RUN_DIR:-runs/demo}
stages=(stage1 stage2 stage3 stage4 eval)
source "$REPO/slurm/_common.sh"  # PYTHON
echo "=== base model ($PRESET -> $RUN_DIR)"
"$PYTHON" scripts/prepare_base.py --run_dir="$RUN_DIR" --config="$PRESET"

if [ -z "${LOCAL:-}" ] && command -v sbatch >/dev/null; then
  dependency=()
  for stage in "${stages[@]}"; do
    array=()
    if [ -n "${ARRAY_TASKS:-}" ] && [ "$stage" != stage4 ]; then
      array=(--array="0-$((ARRAY_TASKS - 1))" --gpus-per-node=1)  # afterok waits for every task
    fi
    # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
    id=$(sbatch --parsable ${SBATCH_ARGS:-} "${array[@]}" "${dependency[@]}" "slurm/$stage.sh")
    echo "$stage: job ${id%%;*}"
    dependency=(--dependency="afterok:${id%%;*}" --kill-on-invalid-dep=yes)
  done
else
  for stage in "${stages[@]}"; do
    echo "=== $stage ($PRESET -> $RUN_DIR)"
    bash "slurm/$stage.sh"
  done
fi
