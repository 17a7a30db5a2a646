"""Export what stage 4 trained in the formats stock diffusers loads.

- full fine-tune: RUN_DIR/stage4/export/ is a complete pipeline folder, the fine-tuned
  `transformer/` beside the base model's other components (hard links where the filesystem
  allows, else copies): `WanPipeline.from_pretrained(export)`.
- LoRA: RUN_DIR/stage4/export/pytorch_lora_weights.safetensors in diffusers' format:
  `WanPipeline.from_pretrained(base).load_lora_weights(export)`.

Under ZeRO-3 the parameters are gathered from all ranks first, so every rank must call this.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from .files import write_atomic

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_pipeline(transformer, base_path: Path, target: Path) -> Path:
    def save(directory: Path):
        shutil.copytree(base_path, directory, ignore=shutil.ignore_patterns("transformer"), copy_function=_link_or_copy)
        transformer.save_pretrained(directory / "transformer")

    if target.exists():
        shutil.rmtree(target)
    return write_atomic(target, save, keep_existing=True)


def export_lora(transformer, target: Path) -> Path:
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    def save(directory: Path):
        WanPipeline.save_lora_weights(
            directory, transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True
        )

    if target.exists():
        shutil.rmtree(target)
    return write_atomic(target, save, keep_existing=True)


def export_model(engine, mode: str, base_path: Path, target: Path) -> Path:
    """Gather (ZeRO-3) and write on rank 0; returns the export folder."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if not dist.is_initialized() or dist.get_rank() == 0:
            if mode == "lora":
                export_lora(module, target)
            else:
                export_pipeline(module, base_path, target)
    if dist.is_initialized():
        dist.barrier()
    return target


def load_exported(export: Path, base_path: Path, dtype: str, device):
    """The fine-tuned pipeline from either export: a full pipeline folder, or LoRA weights on the base model."""
    from .models import load_pipeline

    if (Path(export) / LORA_FILE).is_file():
        pipe = load_pipeline(base_path, dtype, device)
        pipe.load_lora_weights(str(export))
        return pipe
    return load_pipeline(export, dtype, device)
