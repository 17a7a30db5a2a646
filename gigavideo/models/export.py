"""Export what stage 4 trained in the formats stock diffusers loads.

Each trained transformer (pipeline component) is saved first on its own, in RUN_DIR/stage4/trained/
(a full `save_pretrained` folder, or its LoRA file); the export is assembled from those:
- full fine-tune: RUN_DIR/stage4/export/ is a complete pipeline folder, the fine-tuned transformer(s)
  beside the base model's other components (hard links where the filesystem allows, else copies):
  `WanPipeline.from_pretrained(export)`.
- LoRA, one transformer: export/pytorch_lora_weights.safetensors in diffusers' format, with its rank and alpha:
  `WanPipeline.from_pretrained(base).load_lora_weights(export)`; and beside it the same adapters in the original
  Wan key layout (`diffusion_model.` names, alpha stored), export/comfyui_lora.safetensors, which ComfyUI's Wan
  LoRA loader reads (as it reads diffusion-pipe's and musubi-tuner's).
- LoRA, two experts (Wan2.2-A14B): export/transformer/ and export/transformer_2/, the two files each:
  `pipe.load_lora_weights(export / "transformer")` and
  `pipe.load_lora_weights(export / "transformer_2", load_into_transformer_2=True)`.
- LoRA with train.merge_lora: a complete pipeline folder as for a full fine-tune, each trained transformer
  the base's with its adapters fused in (in the base's stored dtype): `WanPipeline.from_pretrained(export)`.

Under ZeRO-3 the parameters are gathered from all ranks first, so every rank must call `save_trained`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from gigavideo.rundir.files import write_atomic, write_json_atomic

log = logging.getLogger("gigavideo.export")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
COMFYUI_LORA_FILE = "comfyui_lora.safetensors"  # the original Wan key layout
# A Wan block's modules: diffusers' names -> the original checkpoint's (which ComfyUI's models use).
WAN_BLOCK_MODULES = {
    **{f"attn1.{d}": f"self_attn.{o}" for d, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))},
    **{f"attn2.{d}": f"cross_attn.{o}" for d, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))},
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
SUMMARY_FILE = "training.json"  # beside a trained component: how its training ended
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_trained(engine, mode: str, target: Path, summary: dict) -> Path:
    """Gather (ZeRO-3) and write the trained transformer (full) or its adapters (LoRA) on rank 0, with the
    summary of its training: the folder appears complete or not at all, so it marks the expert done."""
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=zero3):
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_atomic(target, lambda directory: save_component(module, mode, directory, summary), keep_existing=True)
    if dist.is_initialized():
        dist.barrier()
    return target


def save_component(transformer, mode: str, directory: Path, summary: dict) -> None:
    """One trained transformer: its folder (full), or its adapters in both LoRA layouts; with its summary."""
    if mode == "lora":
        from diffusers import WanPipeline
        from peft.utils import get_peft_model_state_dict

        layers, config = get_peft_model_state_dict(transformer), transformer.peft_config["default"]
        WanPipeline.save_lora_weights(
            directory,
            transformer_lora_layers=layers,
            safe_serialization=True,
            transformer_lora_adapter_metadata=config.to_dict(),  # its alpha: else loaded at alpha = rank
        )
        save_wan_original_lora(layers, config.lora_alpha, directory / COMFYUI_LORA_FILE)
    else:
        transformer.save_pretrained(directory)
    write_json_atomic(directory / SUMMARY_FILE, summary)


def assemble_export(
    trained: dict[str, Path], mode: str, base_path: Path, target: Path, merge_lora: bool = False
) -> Path:
    """The export folder from the trained components ({component: RUN_DIR/stage4/trained/...})."""

    def full(directory: Path):
        shutil.copytree(base_path, directory, ignore=shutil.ignore_patterns(*trained), copy_function=_link_or_copy)
        for component, saved in trained.items():
            if mode == "lora":
                fused_transformer(base_path / component, saved / LORA_FILE).save_pretrained(directory / component)
                continue
            ignore = shutil.ignore_patterns(SUMMARY_FILE)
            shutil.copytree(saved, directory / component, ignore=ignore, copy_function=_link_or_copy)

    def lora(directory: Path):
        for component, saved in trained.items():
            place = directory if list(trained) == ["transformer"] else directory / component
            place.mkdir(parents=True, exist_ok=True)
            for name in (LORA_FILE, COMFYUI_LORA_FILE):
                if (saved / name).is_file():
                    _link_or_copy(str(saved / name), str(place / name))

    if target.exists():
        shutil.rmtree(target)
    return write_atomic(target, lora if mode == "lora" and not merge_lora else full, keep_existing=True)


def save_wan_original_lora(layers: dict, alpha: float, path: Path) -> None:
    """The adapters (PEFT's state dict, diffusers' module names) in the original Wan key layout:
    `diffusion_model.blocks.N.self_attn.q.lora_A.weight`, `.lora_B.weight` and `.alpha`. Adapters of a module with
    no original name (a --lora_targets outside the blocks' attention and FFN) leave this file out, with a warning."""
    from safetensors.torch import save_file

    converted, unnamed = {}, set()
    for key, tensor in layers.items():
        module, _, part = key.rpartition(".lora_")  # "blocks.3.attn1.to_q", "A.weight"
        parts = module.split(".", 2)  # "blocks", "3", "attn1.to_q"
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in WAN_BLOCK_MODULES:
            unnamed.add(module)
            continue
        name = f"diffusion_model.blocks.{parts[1]}.{WAN_BLOCK_MODULES[parts[2]]}"
        converted[f"{name}.lora_{part}"] = tensor.detach().contiguous().cpu()
        converted[f"{name}.alpha"] = torch.tensor(float(alpha))
    if unnamed:
        log.warning("no %s: %s have no name in the original Wan layout", path.name, ", ".join(sorted(unnamed)[:3]))
        return
    save_file(converted, str(path), metadata={"format": "pt"})


def fused_transformer(component: Path, lora_file: Path):
    """The base transformer in `component` with the LoRA of `lora_file` fused into its weights, in the dtype it
    is stored in (the fusion itself runs in float32, so a bfloat16 base rounds once, not per matrix)."""
    import diffusers
    from safetensors import safe_open

    config = json.loads((component / "config.json").read_text())
    weights = sorted(component.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{component}: no .safetensors weights to fuse the LoRA {lora_file} into")
    with safe_open(str(weights[0]), "pt") as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    model_class = getattr(diffusers, config["_class_name"])
    model = model_class.from_pretrained(str(component), dtype=torch.float32)
    model.load_lora_adapter(str(lora_file.parent), weight_name=lora_file.name, prefix="transformer")
    model.fuse_lora()
    model.unload_lora()
    return model.to(SAFETENSORS_DTYPES[stored])


def load_exported(export: Path, base_path: Path, dtype: str, device, attention_backend: str = "auto"):
    """The fine-tuned pipeline from either export: a full pipeline folder, or LoRA file(s) on the base model."""
    from gigavideo.models.pipeline import load_pipeline

    export = Path(export)
    lora_dirs = {c: export / c for c in ("transformer", "transformer_2") if (export / c / LORA_FILE).is_file()}
    if (export / LORA_FILE).is_file():
        lora_dirs = {"transformer": export}
    if not lora_dirs:
        return load_pipeline(export, dtype, device, attention_backend=attention_backend)
    pipe = load_pipeline(base_path, dtype, device, attention_backend=attention_backend)
    for component, folder in lora_dirs.items():
        pipe.load_lora_weights(str(folder), load_into_transformer_2=component == "transformer_2")
    return pipe
