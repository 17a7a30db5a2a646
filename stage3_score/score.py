#!/usr/bin/env python
"""Stage 3: automatic feedback, computed once, offline.

A frozen vision-language model answers each synthetic video's yes/no verification questions;
where the dimension names a specialist (camera motion from dense optical flow, instance counts
from a detector) that scores the video too. Raw scores are kept per question and scorer; the
sample's reward aggregates them (stage 4 maps rewards to training weights). A video that cannot
be scored (corrupt, too short, an answer that is neither yes nor no, a server that keeps failing)
gets status "failed" with its reason and no reward; the stage goes on. Writes RUN_DIR/stage3/,
with report.json and a reward histogram per dimension.
"""

from __future__ import annotations

import logging
from itertools import islice

from tqdm import tqdm

from gigavideo.cli import pick_device, run_cli, start_stage
from gigavideo.distributed import my_share, rank_and_world
from gigavideo.errors import ConfigError, UserError
from gigavideo.eval.rewards import report
from gigavideo.judges.judge import check_judge, describe_judge, load_judge
from gigavideo.judges.scoring import (
    AGGREGATES,
    detector_for,
    score_chunk,
    unreadable_record,
)
from gigavideo.memory import check_judging_memory
from gigavideo.prompts.dimensions import DIMENSIONS_DIR, load_dimension
from gigavideo.rundir.completion import finish_rank
from gigavideo.rundir.fields import is_name
from gigavideo.rundir.layout import read_manifest
from gigavideo.rundir.shards import (
    ShardWriter,
    drop_failed_records,
    index_json,
    iter_samples,
    iter_shard,
    rank_prefix,
    resume_rank,
)

log = logging.getLogger("gigavideo.stage3")


def tally(out):
    """finish_rank's count: every failed record in the stage's shards (this run's and a resumed run's), of all."""

    def count(_failures):
        records = [s for p in sorted(out.glob("*.tar")) for s in iter_shard(str(p), ("json",))]
        failed = [{"key": s["__key__"], "reason": s["json"]["reason"]} for s in records if s["json"]["status"] != "ok"]
        return failed, len(records)

    return count


def preflight(cfg, run):
    """Stage 2's output, the judge, the detector and the dimensions must be there before any work."""
    clip_frames = (read_manifest(run, "stage2").get("render") or {}).get("num_frames")
    sc = cfg.score
    if sc.aggregate not in AGGREGATES:
        raise ConfigError(f"--aggregate={sc.aggregate!r} not in {AGGREGATES}")
    if clip_frames and sc.num_frames > clip_frames:
        raise ConfigError(
            f"--num_frames={sc.num_frames}: stage 2's clips have {clip_frames} frames, so the judge cannot be shown "
            f"more; give at most {clip_frames}, or 0 for the judge family's own sampling"
        )
    check_judge(sc, run)
    check_judging_memory(cfg, run, log)
    stage2 = index_json(run, "stage2", on_error=lambda err: None)  # unreadable samples: main records them as failed
    names = {m["dimension"] for m in stage2.values() if m["source"] == "synthetic"}
    dims = {}
    for name in sorted(names):
        try:
            dims[name] = load_dimension(name, cfg.prompts.dimensions_dir or DIMENSIONS_DIR)
        except FileNotFoundError as err:
            first = next(k for k, m in sorted(stage2.items()) if m["dimension"] == name)
            raise UserError(f"stage-2 sample {first!r}: {err}") from None
    return dims, detector_for(dims.values(), sc)


def videos_to_score(run) -> tuple[dict, list, list]:
    """Stage 2's synthetic samples by key; those that cannot be read (a member missing or their json broken),
    which are scored as failed, like a corrupt mp4; and the failures of those no record can carry (their key is
    not a valid one), for the manifest."""
    unreadable, keyless = [], []
    videos = {k: m for k, m in index_json(run, "stage2", on_error=unreadable.append).items() if m["source"] != "real"}
    for err in unreadable:
        if not is_name(err.key):  # named here, in the manifest's failures and by scripts/check_shards.py
            log.warning("%s; it cannot be scored", err)
            keyless.append({"key": err.key[:200], "reason": str(err)[:500]})
        elif (err.meta or {}).get("source") != "real":
            videos[err.key] = err.meta
    return videos, [err for err in unreadable if err.key in videos], keyless


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Score every synthetic stage-2 video into RUN_DIR/stage3 (e.g. --judge_path=/models/llava --num_frames=16)."""
    started = start_stage("stage3", "score", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, (dims, detector) = started
    rank, world = rank_and_world()
    out = run.stage("stage3")
    videos, unreadable, keyless = videos_to_score(run)
    judge = load_judge(cfg.score, run, pick_device(cfg.model.device))
    if rank == 0:
        log.info("stage 3: %s", describe_judge(judge))
    drop_failed_records(out, rank_prefix(rank))  # an unfinished stage: its failed samples are tried again
    done = resume_rank(out, rank)
    mine = set(k for k in my_share(list(videos), rank, world) if k not in done)
    log.info("stage3: %d synthetic videos, %d for this rank still to score", len(videos), len(mine))
    failures = keyless if rank == 0 else []  # counted once, by one rank

    def write(writer, key, record):
        if record["status"] != "ok":
            log.warning("%s: no score (%s)", key, record["reason"])
            failures.append({"key": key, "reason": record["reason"]})
        writer.write({"__key__": key, "json": record})

    todo = iter_samples(run, "stage2", fields=("json", "mp4"), keys=mine, on_error=lambda err: None)  # no arrays
    with (
        ShardWriter(out, "stage3", rank_prefix(rank), cfg.score.samples_per_shard) as writer,
        tqdm(total=len(mine), desc=f"score rank {rank}", unit="video", position=rank) as progress,
    ):
        for err in (err for err in unreadable if err.key in mine):
            write(writer, err.key, unreadable_record(err, judge))
            progress.update(1)
        while chunk := list(islice(todo, cfg.score.batch_size)):
            for sample, record in zip(chunk, score_chunk(chunk, judge, dims, cfg.score, detector), strict=True):
                write(writer, sample["__key__"], record)
            progress.update(len(chunk))
    info = {"judge": judge.name, "judge_input": getattr(judge, "input", None), "failures": failures}

    def finalize(parts: list[dict]) -> dict:  # before the manifest, which marks the stage complete
        report(run)
        return {}

    finish_rank(out, "stage3", rank, world, info, tally(out), cfg.score.max_failed_fraction, finalize)


if __name__ == "__main__":
    run_cli(main, "score")
