"""Checkpointing, owned here: DeepSpeed checkpoints in RUN_DIR/stage4/checkpoints, keep-last-K, resume.

Each checkpoint is a DeepSpeed tag folder `stepNNNNNNN` (convert with its `zero_to_fp32.py`) whose
client state holds the step and the config; `latest` names the newest complete one. Its `gigavideo.json`
says what the run was shaped like (`shape`: mode, LoRA rank ...), which a resume cannot change.

A resume with as many data-parallel ranks as wrote the checkpoint loads it as it is (exactly). With another
number (a requeue got other nodes), the checkpoint is converted once to DeepSpeed's universal format
(`stepNNNNNNN_universal`, weights and optimizer state consolidated) and loaded from there, re-partitioned.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
from pathlib import Path

import torch.distributed as dist

from gigavideo.errors import UserError
from gigavideo.rundir.files import DISK_FULL, DiskFull, expect_to_write, write_json_atomic

log = logging.getLogger("gigavideo.train.checkpoint")
SHAPE_FILE = "gigavideo.json"
UNIVERSAL = "_universal"


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def complete_tags(directory: Path) -> list[Path]:
    """The checkpoint folders, oldest first (not their universal conversions)."""
    return sorted(p for p in Path(directory).glob("step*") if p.is_dir() and p.name[4:].isdigit())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def save(
    engine,
    directory: Path,
    step: int,
    client_state: dict,
    keep_last: int,
    trainable_only: bool = False,
    shape: dict | None = None,
) -> None:
    """All ranks call this. trainable_only (LoRA) leaves the frozen base weights out of the checkpoint.

    A disk that fills during the save is a DiskFull naming the checkpoint (torch's writer says only "unexpected
    pos"); the partial folder is removed, and `latest` still names the last complete checkpoint."""
    tags = complete_tags(directory)
    expect_to_write(Path(directory), folder_bytes(tags[-1]) if tags else 0)
    target = Path(directory) / tag_for(step)
    try:
        if engine.global_rank == 0:  # before DeepSpeed writes `latest`, so every checkpoint it names has it
            write_json_atomic(target / SHAPE_FILE, {"shape": shape or {}, "world_size": dp_world_size(engine)})
        engine.save_checkpoint(
            str(directory),
            tag=tag_for(step),
            # what DeepSpeed's universal conversion needs (a resume with another number of ranks)
            client_state={"step": step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
            | client_state,
            exclude_frozen_parameters=trainable_only,
        )
    except (OSError, RuntimeError) as err:
        full = isinstance(err, OSError) and err.errno in DISK_FULL
        if not full and shutil.disk_usage(directory).free > max(64 * 2**20, folder_bytes(target)):
            raise  # not the disk: a bug, or a file system error of another kind
        shutil.rmtree(target, ignore_errors=True)
        raise DiskFull(f"checkpoint {target.name}", Path(directory)) from err
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        for old in complete_tags(directory)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + UNIVERSAL), ignore_errors=True)
        log.info("saved checkpoint %s", Path(directory) / tag_for(step))


def dp_world_size(engine) -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def latest_tag(directory: Path) -> str | None:
    latest = Path(directory) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def saved_world_size(folder: Path) -> int:
    """The data-parallel ranks that wrote a checkpoint folder: one optimizer-state file each."""
    return len(list(folder.glob("*zero_pp_rank_*_optim_states.pt"))) or 1


def prepare_resume(directory: Path, world_size: int, shape: dict) -> str | None:
    """Every rank calls this before its engine is built. Returns the tag to load (None: a fresh start): the latest
    checkpoint, or its universal conversion (made here, by rank 0) where it was written by another number of
    ranks. A UserError where the checkpoint cannot be resumed by this run (another mode, LoRA rank ...)."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    folder = Path(directory) / tag
    recorded = json.loads((folder / SHAPE_FILE).read_text()) if (folder / SHAPE_FILE).is_file() else {}
    differ = {k: (v, shape.get(k)) for k, v in recorded.get("shape", {}).items() if shape.get(k) != v}
    if differ:
        saved, asked = (", ".join(f"{k}={v[i]!r}" for k, v in differ.items()) for i in (0, 1))
        raise UserError(
            f"{folder} was written with {saved}; this run asks for {asked}, which a checkpoint cannot be resumed "
            f"into. Train with the checkpoint's settings, or start over with --overwrite."
        )
    saved = saved_world_size(folder)
    if saved == world_size:
        return tag
    universal = folder.with_name(tag + UNIVERSAL)
    if (not dist.is_initialized() or dist.get_rank() == 0) and not universal.is_dir():
        log.warning(
            "%s was written by %d data-parallel ranks and this run has %d: converting it to DeepSpeed's universal "
            "checkpoint %s (weights and optimizer state, re-partitioned on load); each rank restarts its epoch",
            folder,
            saved,
            world_size,
            universal.name,
        )
        convert_to_universal(folder, universal)
    if dist.is_initialized():
        dist.barrier()
    return universal.name


def convert_to_universal(folder: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal, into a scratch folder renamed onto target when complete."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    scratch = target.parent / f".universal-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(folder),
        output_folder=str(scratch / target.name),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal(args)
    os.replace(scratch / target.name, target)
    shutil.rmtree(scratch, ignore_errors=True)


def resume(engine, directory: Path, tag: str | None, trainable_only: bool = False) -> dict | None:
    """Load checkpoint `tag` (prepare_resume's), if any; returns its client state."""
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=not trainable_only)
    if path is None:
        raise FileNotFoundError(f"{directory}/{tag} cannot be loaded")
    log.info("resumed from %s at step %d", path, client_state["step"])
    return client_state
