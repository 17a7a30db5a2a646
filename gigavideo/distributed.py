"""Rank and world size from torchrun or SLURM variables, and the split of work by key."""

from __future__ import annotations

import os
from pathlib import Path


def rank_and_world() -> tuple[int, int]:
    """torchrun sets RANK/WORLD_SIZE; `srun` with one task per GPU sets SLURM_PROCID/SLURM_NTASKS."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if world_var in os.environ:
            return int(os.environ.get(rank_var, 0)), int(os.environ[world_var])
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def my_share(items: list, rank: int, world_size: int, key=None) -> list:
    """The one work split of every stage and the eval: each rank sorts the same items (by `key`) and takes every
    world_size-th, so the ranks cover the work disjointly and completely without talking to each other."""
    return sorted(items, key=key)[rank::world_size]


def device_for_rank():
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def single_process_defaults() -> None:
    """Let `python train.py` run without torchrun: a world of one on a free local port."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def import_deepspeed():
    """deepspeed, with its CPU accelerator where there is no CUDA device (it picks an accelerator as it imports)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        clear_stale_build_lock("deepspeed_shm_comm")
    import deepspeed

    return deepspeed


def clear_stale_build_lock(extension: str, stale_after_s: float = 600.0) -> bool:
    """Remove the lock a killed JIT build of a torch extension left behind (DeepSpeed builds its CPU
    communication op on first use, in about a minute). torch waits on such a lock forever, with no message,
    so every later stage 4 would hang.

    Every stage 4 that may build records itself (host, pid, SLURM job) beside the lock while it lives. A lock is
    stale at once when every process recorded there is gone (gigavideo.rundir.locks.why_stale), or, where none
    is recorded (a build by something else), once it is older than `stale_after_s`. While one may be building,
    a line says so: the wait that follows is that build's, not a hang."""
    import atexit
    import json
    import logging
    import time

    from torch.utils.cpp_extension import _get_build_directory

    from gigavideo.rundir.locks import describe, this_process, why_stale

    log = logging.getLogger("gigavideo.distributed")
    build = Path(_get_build_directory(extension, verbose=False))
    users, me = build / "gigavideo-users", this_process()
    users.mkdir(parents=True, exist_ok=True)
    mine = users / f"{me['host']}-{me['pid']}.json"
    mine.write_text(json.dumps(me))
    atexit.register(mine.unlink, missing_ok=True)
    lock = build / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    live, gone = [], 0
    for path in users.glob("*.json"):
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if path == mine:
            continue
        if why_stale(holder) is None:
            live.append(holder)
        else:
            path.unlink(missing_ok=True)
            gone += 1
    if live:
        holder = describe(live[0])
        log.info("waiting for the build of %s that %s may be running (torch's lock %s)", extension, holder, lock)
        return False
    if not gone and age < stale_after_s:  # nobody recorded: a build by something else, maybe running
        log.info("waiting for a build of %s (torch's lock %s, %.0f s old)", extension, lock, age)
        return False
    log.warning("removing %s: the build of %s that left it is gone; torch would wait on it forever", lock, extension)
    lock.unlink(missing_ok=True)
    return True
