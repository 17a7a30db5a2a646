"""One writer per stage and rank: a lock file in RUN_DIR/.locks, held for the life of the process.

A second process for the same stage and rank (a job resubmitted while the first still runs) refuses to
start and names the holder. A lock whose holder is gone (the process has exited on the same host, or its
SLURM job has ended) is taken over.

What it relies on, so that it works on NFS, Lustre and GPFS as on a local disk: creating a file with
O_CREAT | O_EXCL is atomic (NFSv3 and later), and so is a rename, of which only one contender succeeds.
It uses no fcntl or flock locks, which need a lock daemon that clusters often lack. Across hosts a holder
is known dead only through SLURM (`squeue`); without SLURM, a lock left by a crashed host stays until
its file is removed, and the error says which file.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("gigavideo.rundir.locks")
LOCK_DIR = ".locks"
LIVE_SLURM_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


class StageLocked(RuntimeError):
    """Another live process holds this stage and rank."""


def _stat_field(pid: int, index: int) -> str | None:
    """A field of /proc/PID/stat after the command name (0: the state, 19: the start time), where /proc has it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[index]
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (tells a reused pid apart)."""
    return _stat_field(pid, 19)


def this_process() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _start_time(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def why_stale(holder: dict) -> str | None:
    """Why the holder is known to be gone, or None while it may be alive."""
    me = this_process()
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and holder.get("slurm_restart_count", 0) < me["slurm_restart_count"]:
        return f"SLURM job {job} was requeued since"
    if holder.get("host") == me["host"]:
        pid = int(holder.get("pid", -1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} has exited"
        except PermissionError:
            return None  # alive, another user's
        if _stat_field(pid, 0) == "Z":  # killed, and its parent (gone too) left it to an init that has not reaped it
            return f"process {pid} has exited (a zombie not yet reaped)"
        if holder.get("pid_start") and _start_time(pid) != holder["pid_start"]:
            return f"process {pid} has exited (its pid was reused)"
        return None
    if job:
        try:
            state = subprocess.run(
                ["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if state.returncode == 0 and not LIVE_SLURM_STATES.intersection(state.stdout.split()):
            return f"SLURM job {job} has ended"
    return None


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"


def acquire(run_path: Path, stage: str, rank: int) -> Path:
    """Hold RUN_DIR/.locks/STAGE-rankNNNNN.lock until this process exits; raise StageLocked if a live
    process holds it."""
    path = Path(run_path) / LOCK_DIR / f"{stage}-rank{rank:05d}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = this_process()
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                continue  # gone meanwhile, or being written: try again
            reason = "its lock file is unreadable and over a minute old" if holder.get("unreadable") else None
            reason = reason or why_stale(holder)
            if reason is None:
                raise StageLocked(
                    f"{stage} (rank {rank}) is already running in {run_path}: {describe(holder)}. Two processes "
                    f"on one stage would write the same samples; wait for it or cancel it. If it is surely gone "
                    f"(a crashed host), remove {path}."
                ) from None
            _take_over(path, holder, reason)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release, path, me)
        return path
    raise StageLocked(f"could not take {path}: other processes keep taking it; is a job submitted twice?")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half written: its writer is alive, or died in the first microseconds
        if time.time() - path.stat().st_mtime > 60:
            return {"host": None, "pid": None, "since": "?", "unreadable": True}
        time.sleep(0.2)
        return None


def _take_over(path: Path, holder: dict, reason: str) -> None:
    """Set the dead holder's lock aside by an atomic rename; if a contender renewed it meanwhile, put it back."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another contender took it over first
    if _read(aside) not in (holder, None) and not holder.get("unreadable"):
        try:
            os.link(aside, path)  # a fresh lock was renamed by mistake: restore it (fails if path exists)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    log.warning("took over %s from a holder that is gone (%s): %s", path, reason, describe(holder))


def release(path: Path, me: dict) -> None:
    """Remove the lock if it is still this process's."""
    if _read(path) == me:
        path.unlink(missing_ok=True)
