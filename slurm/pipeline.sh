#!/bin/bash
# The whole pipeline: first the base step here (scripts/prepare_base.py: checks model.path, or builds the
# tiny base, or pre-trains the toy world's), then submits stage1 -> stage2 -> stage3 -> stage4 -> eval
# chained with --dependency=afterok, or, where there is no sbatch or LOCAL=1, runs them here one after another.
#   PRESET=configs/my-wan.toml RUN_DIR=/scratch/gv/run1 bash slurm/pipeline.sh
#   SBATCH_ARGS="--partition=gpu --account=me" bash slurm/pipeline.sh     (extra sbatch options, every stage)
#   LOCAL=1 PRESET=toy RUN_DIR=runs/demo bash slurm/pipeline.sh           (what `make demo` runs)
#   ARRAY_TASKS=64 bash slurm/pipeline.sh    (stages 1-3 and the eval as 64-task job arrays: a failed task
#                                            reruns alone; stage 4 stays one multi-node job)
#   ROUNDS=3 bash slurm/pipeline.sh          (closed loop: round R in RUN_DIR/roundR starts from round R-1's
#                                            model; each round first diagnoses its base where the preset has
#                                            prompts.dimensions = ["auto"]; a rerun skips completed rounds;
#                                            RUN_DIR/rounds.md compares every round with the base at the end)
# Per-stage flags belong in the preset file (e.g. model.path, score.judge_path); see README.md and docs/config.md.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
if [ -z "${LOCAL:-}" ] && command -v sbatch >/dev/null; then submit=1; else submit=""; fi
if [ -n "$submit" ] && { [ -z "${PRESET:-}" ] || [ -z "${RUN_DIR:-}" ]; }; then
  echo "error: to submit the pipeline, set PRESET and RUN_DIR (e.g. PRESET=configs/my-wan.toml" \
    "RUN_DIR=/shared/runs/run1 bash slurm/pipeline.sh); LOCAL=1 runs it here with the defaults (tiny, runs/demo)" >&2
  exit 2
fi
export PRESET=${PRESET:-tiny} RUN_DIR=${RUN_DIR:-runs/demo}
source "$REPO/slurm/_common.sh"  # PYTHON
dependency=()

# step NAME: one step on RUN_DIR with PRESET (both exported): a job chained after the previous one, or run here.
step() {
  local name=$1 script=$1 args=()
  if [ "$name" = diagnosis ]; then script=eval args=(--diagnose); fi
  if [ "$name" = rounds ]; then script=rounds; fi
  if [ -z "$submit" ]; then
    echo "=== $name ($PRESET -> $RUN_DIR)"
    bash "slurm/$script.sh" "${args[@]}"
    return
  fi
  local array=()
  if [ -n "${ARRAY_TASKS:-}" ] && [ "$name" != stage4 ] && [ "$name" != rounds ]; then
    array=(--array="0-$((ARRAY_TASKS - 1))" --gpus-per-node=1)  # afterok waits for every task
  fi
  # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
  id=$(sbatch --parsable --job-name="gv-$name" ${SBATCH_ARGS:-} "${array[@]}" "${dependency[@]}" \
    "slurm/$script.sh" "${args[@]}")
  echo "$name: job ${id%%;*}"
  dependency=(--dependency="afterok:${id%%;*}" --kill-on-invalid-dep=yes)
}

if [ -z "${ROUNDS:-}" ]; then
  echo "=== base model ($PRESET -> $RUN_DIR)"
  steps=$("$PYTHON" scripts/prepare_base.py --run_dir="$RUN_DIR" --config="$PRESET" | tail -n 1)
  for name in $steps; do step "$name"; done
  exit 0
fi

top=$RUN_DIR top_preset=$PRESET
for round in $(seq 1 "$ROUNDS"); do
  echo "=== round $round of $ROUNDS ($top_preset -> $top/round$round)"
  # the last line it prints: libraries may print above it
  steps=$("$PYTHON" scripts/prepare_round.py --run_dir="$top" --config="$top_preset" --round="$round" | tail -n 1)
  if [ "$steps" = complete ]; then
    echo "round $round: complete (its eval has finished); skipped"
    continue
  fi
  export PRESET=$top/round$round/preset.toml RUN_DIR=$top/round$round
  for name in $steps; do step "$name"; done
done
export PRESET=$top_preset RUN_DIR=$top
ROUNDS=$ROUNDS step rounds
