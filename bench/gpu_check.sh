#!/bin/bash
# The GPU check (one GPU, under 8 minutes): Wan2.1-1.3B's architecture at 832x480x81, random weights, bf16.
# Prints one table: stage 4's step time, tokens/s, MFU and peak memory beside the memory planner's prediction
# (full fine-tuning and LoRA, gradient checkpointing), and stage 2's seconds per video at 50 steps without and
# with --cache=first_block, with how far caching moved the latents; then each attention backend that can run
# there (stage-4 LoRA step, stage-2 sampling, speed-up over native, latents moved). Put the tables in docs/attention.md and docs/memory.md (docs/benchmarks.md says where each figure lives).
#   bash bench/gpu_check.sh              (from the repository root, on a machine with a GPU)
#   bash bench/gpu_check.sh --dry_run    (CPU, tiny preset and size: the same code path in under a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [[ " $* " != *" --dry_run "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader  # no GPU: the check stops here
fi
"$PYTHON" -c 'import torch, deepspeed, diffusers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, diffusers {diffusers.__version__}")'
# 8 minutes at most: a hung kernel or a slow GPU ends the check instead of the lease.
exec timeout 480 "$PYTHON" bench/gpu_check.py "$@"
