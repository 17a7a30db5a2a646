"""The completion protocol: each rank writes its part, the last rank writes the manifest, which marks the
stage complete (and is refused where more samples failed than the stage allows)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from gigavideo.errors import StageFailed
from gigavideo.rundir.fields import SchemaError
from gigavideo.rundir.files import write_json_atomic
from gigavideo.rundir.layout import MANIFEST, SET_ASIDE, RunDir
from gigavideo.rundir.shards import discard_partial_shards, set_aside_duplicates, shard_keys
from gigavideo.rundir.transaction import INPUTS, commit_if_redone, content_id, read_inputs

log = logging.getLogger("gigavideo.rundir")


PROCESS_STARTED = time.time()  # (about) when this process started: a stage's cost is its processes' wall time


def check_failed(stage: str, failed: list[dict], total: int, max_fraction: float, what: str = "samples") -> None:
    """The rule of every stage: when more than `max_fraction` of its `total` samples (or all of them) failed, the
    stage has failed. A StageFailed names the count and the first failure; the caller writes no manifest, so the
    stage is not taken as done and a rerun tries the failed ones again."""
    if not failed or (len(failed) <= max_fraction * total and len(failed) < total):
        return
    first = failed[0]
    raise StageFailed(
        f"{stage}: {len(failed)} of {total} {what} failed, more than max_failed_fraction = {max_fraction:g} allows; "
        f"the first, {first['key']}: {first['reason']}. No manifest written: fix the cause and rerun (the failed "
        "ones are tried again)."
    )


def set_aside_unreadable_manifest(run: RunDir, stage: str) -> Path | None:
    """A manifest that does not parse (a disk filled while it was written, a copy cut short) is set aside
    as manifest.json.set-aside-unreadable, so that the stage runs again instead of being taken as done."""
    path = run.manifest(stage)
    try:
        if json.loads(path.read_text()).get("stage") == stage:
            return None
    except (OSError, ValueError, AttributeError):
        pass
    aside = path.with_name(f"{path.name}{SET_ASIDE}unreadable")
    os.replace(path, aside)
    log.warning("%s is unreadable: set aside as %s; %s runs again (and resumes)", path, aside.name, stage)
    return aside


def current_run_id() -> str:
    """Identifies one launch of a stage: torchrun's run id (+ SLURM requeue count), a job array's task, else
    this process."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job, task = os.environ["SLURM_ARRAY_JOB_ID"], os.environ.get("SLURM_ARRAY_TASK_ID", "0")
        return f"array{job}-task{task}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return f"pid{os.getpid()}-{time.time_ns()}"
    return f"{run_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"


RUN_ID = current_run_id()


def rank_parts(stage_dir: Path, rank: int, world_size: int, info: dict) -> list[dict] | None:
    """Record this rank's result; return every rank's result to exactly one rank once all are in.

    No collective is needed, so ranks may finish hours apart. In one launch (torchrun), parts from an
    earlier launch do not count. The tasks of a SLURM job array are launches of their own (a failed task
    is resubmitted alone), so there every rank's latest part counts. Of the ranks that see all parts,
    only the one that claims the finalize file for that set of parts gets them.
    """
    parts = Path(stage_dir) / "_parts"
    info = {**info, "run_id": RUN_ID, "process_seconds": round(time.time() - PROCESS_STARTED, 2)}
    write_json_atomic(parts / f"rank{rank:05d}-of-{world_size:05d}.json", info)
    done = [json.loads(p.read_text()) for p in sorted(parts.glob(f"rank*-of-{world_size:05d}.json"))]
    if not RUN_ID.startswith("array"):
        done = [d for d in done if d.get("run_id") == RUN_ID]
    if len(done) < world_size:
        return None
    claim = RUN_ID if not RUN_ID.startswith("array") else "array-" + "+".join(sorted({d["run_id"] for d in done}))
    claim = claim if len(claim) < 200 else f"array-{hash_text(claim)}"
    try:
        os.close(os.open(parts / f"finalize-{claim}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    return done


def process_seconds(parts: list[dict]) -> float:
    """What a stage cost: the wall time of its processes (of the launch that finished it), summed over ranks;
    with one process per GPU, GPU-seconds."""
    return round(sum(part.get("process_seconds", 0.0) for part in parts), 2)


def hash_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finish_rank(
    stage_dir: Path,
    stage: str,
    rank: int,
    world_size: int,
    info: dict,
    tally: Callable[[list[dict]], tuple[list[dict], int]] | None = None,
    max_failed_fraction: float = 0.5,
    finalize: Callable[[list[dict]], dict] | None = None,
    parts_dir: Path | None = None,
    what: str = "samples",
) -> dict | None:
    """The one way a stage (and the eval) completes. Record this rank as done, with its `info`, in `parts_dir`
    (default the stage's folder). The one rank that finds all ranks done checks the failures (`tally(failures)`
    -> the stage's failed samples and its total; too many: StageFailed, see `check_failed`), runs
    `finalize(parts)` (the work only one rank does: a selection, a report, an export; it returns more manifest
    fields) and writes the manifest: the ranks' `failures` and `counts` summed, the other fields of `info` the
    finalizing rank's.

    Returns the manifest on the rank that wrote it (the stage is complete), else None.
    """
    parts = rank_parts(parts_dir or stage_dir, rank, world_size, info)
    if parts is None:
        return None
    failures = [f for part in parts for f in part.get("failures", [])]
    counted = {}
    if tally is not None:
        failed, total = tally(failures)
        check_failed(stage, failed, total, max_failed_fraction, what)
        counted = {"samples_failed": len(failed), "samples_total": total}
    discard_partial_shards(stage_dir)  # every rank of this run is done: any .tmp left is from an older run
    set_aside = set_aside_duplicates(stage_dir)  # before finalize, which may read the shards (stage 3's report)
    extra = finalize(parts) if finalize is not None else {}
    failures += extra.pop("failures", [])  # what the finalizing rank found (e.g. stage 1's real captions)
    seconds = {r: s for part in parts for r, s in part.get("device_seconds", {}).items()}
    counts = sum((Counter(part.get("counts", {})) for part in parts), Counter())  # e.g. truncated prompts
    return write_manifest(
        stage_dir,
        stage,
        {
            **info,
            "failures": failures,
            "world_size": world_size,
            "process_seconds": process_seconds(parts),
            **counted,
            **({"device_seconds": seconds} if seconds else {}),
            **({"counts": dict(counts)} if counts else {}),
            **({"set_aside": set_aside} if set_aside else {}),
            **extra,
        },
    )


def write_manifest(stage_dir: Path, stage: str, info: dict) -> dict:
    shards = [{"name": p.name, "samples": len(shard_keys(p))} for p in sorted(Path(stage_dir).glob("*.tar"))]
    all_keys = Counter(k for p in sorted(Path(stage_dir).glob("*.tar")) for k in shard_keys(p))
    duplicates = sorted(k for k, n in all_keys.items() if n > 1)
    if duplicates:
        raise SchemaError(f"{stage_dir}: keys written more than once: {duplicates[:10]}")
    manifest = {
        "stage": stage,
        "shards": shards,
        "num_samples": sum(all_keys.values()),
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **info,
        **({"inputs": inputs} if (inputs := read_inputs(Path(stage_dir) / INPUTS)) is not None else {}),
    }
    manifest["id"] = content_id(manifest, Path(stage_dir).parent)
    write_json_atomic(Path(stage_dir) / MANIFEST, manifest)
    commit_if_redone(stage_dir, stage)  # an --overwrite's old outputs go only now
    return manifest
