"""Checkpointing, owned here: DeepSpeed checkpoints in RUN_DIR/stage4/checkpoints, keep-last-K, resume.

Each checkpoint is a DeepSpeed tag folder `stepNNNNNNN` (convert with its `zero_to_fp32.py`) whose
client state holds the step and the config; `latest` names the newest complete one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("gigavideo.checkpoint")


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def save(engine, directory: Path, step: int, client_state: dict, keep_last: int, trainable_only: bool = False) -> None:
    """All ranks call this. trainable_only (LoRA) leaves the frozen base weights out of the checkpoint."""
    engine.save_checkpoint(
        str(directory),
        tag=tag_for(step),
        client_state={"step": step, **client_state},
        exclude_frozen_parameters=trainable_only,
    )
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        tags = sorted(p for p in Path(directory).glob("step*") if p.is_dir())
        for old in tags[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", Path(directory) / tag_for(step))


def resume(engine, directory: Path, trainable_only: bool = False) -> dict | None:
    """Load the newest checkpoint, if any; returns its client state."""
    if not (Path(directory) / "latest").is_file():
        return None
    path, client_state = engine.load_checkpoint(str(directory), load_module_strict=not trainable_only)
    if path is None:
        raise FileNotFoundError(f"{directory}/latest names a checkpoint that cannot be loaded")
    log.info("resumed from %s at step %d", path, client_state["step"])
    return client_state
