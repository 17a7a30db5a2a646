#!/usr/bin/env python
"""Will it fit: the memory planner for any preset, per GPU, for stage 4, stage 2 and stage 3's judge (predicted).

    python bench/memory_plan.py --preset=wan2.1-t2v-1.3b --nodes=1 --gpus_per_node=8 --gpu_mem_gib=80
    python bench/memory_plan.py --preset=wan2.2-t2v-a14b --gpu_mem_gib=141 --mode=lora --json

Any config key is a flag (--mode=lora, --ds_config=ds_configs/zero3.json, --micro_batch_size=2, --batch_size=8 ...).
It says first what the global batch (train.batch_size) becomes on those GPUs, or what to change where they cannot
make it.
"""

from __future__ import annotations

import json as json_lib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # quiet: DeepSpeed's estimators need no accelerator

from transformers import LlavaOnevisionConfig

from gigavideo.cli import run_cli
from gigavideo.config import load_config
from gigavideo.errors import ConfigError
from gigavideo.memory import describe, judge_plan, render_plan, train_plan
from gigavideo.train.batch import describe as describe_batch
from gigavideo.train.batch import plan_batch
from gigavideo.train.ds_config import build_ds_config

# LLaVA-Video-7B-Qwen2's architecture: transformers' LlavaOnevisionConfig (its SigLIP-so400m tower at 384 px) with
# Qwen2-7B as the language model (Qwen2-7B's config.json).
LLAVA_VIDEO_7B = LlavaOnevisionConfig(
    text_config={
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
    }
)


def main(
    preset: str = "wan2.1-t2v-1.3b",
    nodes: int = 1,
    gpus_per_node: int = 8,
    gpu_mem_gib: float = 80.0,
    json: bool = False,
    **overrides,
):
    """Plan stage 4, stage 2 and stage 3's judge on NODES x GPUS_PER_NODE GPUs of GPU_MEM_GIB each."""
    cfg = load_config(preset, "train", overrides)
    world = nodes * gpus_per_node
    batch = batch_on(cfg, world)
    plans = [
        train_plan(cfg, build_ds_config(cfg.train, world), nodes, gpus_per_node, gpu_mem_gib) | {"batch": batch},
        render_plan(cfg, nodes, gpus_per_node, gpu_mem_gib),
        # stage 3's judge: the paper's LLaVA-Video-7B-Qwen2 at its card's 64 frames (64 x 196 + 1 visual tokens)
        judge_plan(LLAVA_VIDEO_7B, 64 * 196 + 1, 64, cfg.score.batch_size, cfg.score.dtype, gpu_mem_gib),
    ]
    if json:
        print(json_lib.dumps(plans, indent=1, sort_keys=True))
    else:
        print(f"stage4 on {world} GPUs: {batch}\n")
        print("\n\n".join(describe(p) for p in plans))


def batch_on(cfg, world: int) -> str:
    """What the global batch becomes on `world` GPUs, or why it cannot be made there and what to change; in that
    case memory is planned for the smallest global batch those GPUs make (the memory depends on the micro-batch)."""
    try:
        return describe_batch(plan_batch(cfg.train, world))
    except ConfigError as err:
        cfg.train.batch_size = cfg.train.micro_batch_size * world
        return f"{err} (memory planned below for --batch_size={cfg.train.batch_size})"


if __name__ == "__main__":
    run_cli(main, "train")
