"""Export the fine-tuned transformer as a complete diffusers pipeline folder.

RUN_DIR/stage4/export/ holds the fine-tuned `transformer/` and the base model's other components
(hard links where the filesystem allows, else copies), so `WanPipeline.from_pretrained(export)`
loads it with stock diffusers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .models import save_atomic


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_pipeline(transformer, base_path: Path, target: Path) -> Path:
    def save(directory: Path):
        shutil.copytree(base_path, directory, ignore=shutil.ignore_patterns("transformer"),
                        copy_function=_link_or_copy)
        transformer.save_pretrained(directory / "transformer")

    if target.exists():
        shutil.rmtree(target)
    return save_atomic(save, target)
