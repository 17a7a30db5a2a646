#!/usr/bin/env python
"""Will it fit: the memory planner for any preset, per GPU, for stage 4 and stage 2 (predicted).

    python bench/memory_plan.py --preset=wan2.1-t2v-1.3b --nodes=1 --gpus_per_node=8 --gpu_mem_gib=80
    python bench/memory_plan.py --preset=wan2.2-t2v-a14b --gpu_mem_gib=141 --mode=lora --json

Any config key is a flag (--mode=lora, --ds_config=ds_configs/zero3.json, --micro_batch_size=2 ...).
"""

from __future__ import annotations

import json as json_lib
import os

import fire
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # quiet: DeepSpeed's estimators need no accelerator

from gigavideo.config import load_config
from gigavideo.ds_config import build_ds_config
from gigavideo.memory import describe, render_plan, train_plan


def main(
    preset: str = "wan2.1-t2v-1.3b",
    nodes: int = 1,
    gpus_per_node: int = 8,
    gpu_mem_gib: float = 80.0,
    json: bool = False,
    **overrides,
):
    cfg = load_config(preset, "train", overrides)
    world = nodes * gpus_per_node
    plans = [
        train_plan(cfg, build_ds_config(cfg.train, world), nodes, gpus_per_node, gpu_mem_gib),
        render_plan(cfg, nodes, gpus_per_node, gpu_mem_gib),
    ]
    if json:
        print(json_lib.dumps(plans, indent=1, sort_keys=True))
    else:
        print("\n\n".join(describe(p) for p in plans))


if __name__ == "__main__":
    fire.Fire(main)
