#!/usr/bin/env python
"""Stage 3: automatic feedback, computed once, offline.

A frozen vision-language model answers each synthetic video's yes/no verification question;
P(yes) is the sample's reward (stage 4 maps rewards to training weights). A video that cannot be
scored gets status "failed" with its reason and no reward; the stage goes on. Writes RUN_DIR/stage3/.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from gigavideo.cli import pick_device, run_cli, start_stage  # noqa: E402
from gigavideo.distributed import my_slice, rank_and_world  # noqa: E402
from gigavideo.judge import judge_path, load_judge  # noqa: E402
from gigavideo.schema import (ShardWriter, finish_rank, index_json, iter_samples, rank_prefix,  # noqa: E402
                              read_manifest, resume_rank, write_json_atomic)
from gigavideo.video import VideoError, decode_mp4  # noqa: E402

log = logging.getLogger("gigavideo.stage3")
MIN_FRAMES = 2


def score_sample(judge, sample) -> dict:
    meta = sample["json"]
    record = {"dimension": meta["dimension"], "question": meta["question"], "judge": judge.name,
              "status": "failed", "reason": None, "p_yes": None, "answer": None, "reward": None}
    try:
        frames, _ = decode_mp4(sample["mp4"], f"{sample['__key__']} in {sample['__url__']}")
        if len(frames) < MIN_FRAMES:
            raise VideoError(f"{sample['__key__']}: only {len(frames)} frames (need {MIN_FRAMES})")
    except VideoError as err:
        return record | {"reason": f"video: {err}"}
    p_yes, answer = judge.score(frames, meta["question"])
    return record | {"status": "ok", "p_yes": p_yes, "answer": answer, "reward": p_yes}


def summarize(run) -> dict:
    """Per dimension: count, mean reward, failures by reason."""
    summary: dict = {}
    for record in index_json(run, "stage3").values():
        dim = summary.setdefault(record["dimension"], {"scored": 0, "failed": {}, "reward_sum": 0.0})
        if record["status"] == "ok":
            dim["scored"] += 1
            dim["reward_sum"] += record["reward"]
        else:
            reason = record["reason"].split(":", 1)[0]
            dim["failed"][reason] = dim["failed"].get(reason, 0) + 1
    for dim in summary.values():
        dim["mean_reward"] = dim.pop("reward_sum") / dim["scored"] if dim["scored"] else None
    return summary


def preflight(cfg, run):
    """Stage 2's output and the judge must exist before any work (or any --overwrite)."""
    read_manifest(run, "stage2")
    return judge_path(cfg.score, run)


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Score every synthetic stage-2 video with the judge into RUN_DIR/stage3 (e.g. --judge_path=/models/llava --num_frames=16)."""
    started = start_stage("stage3", "score", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, _ = started
    rank, world = rank_and_world()
    out = run.stage("stage3")
    videos = {k: m for k, m in index_json(run, "stage2").items() if m["source"] == "synthetic"}
    judge = load_judge(cfg.score, run, pick_device(cfg.model.device))
    done = resume_rank(out, rank)
    mine = set(k for k in my_slice(list(videos), rank, world) if k not in done)
    log.info("stage3: %d synthetic videos, %d for this rank still to score", len(videos), len(mine))
    failures = []
    with ShardWriter(out, "stage3", rank_prefix(rank), cfg.score.samples_per_shard) as writer, \
            tqdm(total=len(mine), desc=f"score rank {rank}", unit="video", position=rank) as progress:
        for sample in iter_samples(run, "stage2"):
            if sample["__key__"] not in mine:
                continue
            record = score_sample(judge, sample)
            if record["status"] != "ok":
                log.warning("%s: no score (%s)", sample["__key__"], record["reason"])
                failures.append({"key": sample["__key__"], "reason": record["reason"]})
            writer.write({"__key__": sample["__key__"], "json": record})
            progress.update(1)
    if finish_rank(out, "stage3", rank, world, {"judge": judge.name, "failures": failures}):
        summary = summarize(run)
        write_json_atomic(out / "report.json", summary)
        for name, dim in sorted(summary.items()):
            log.info("%-20s scored %4d  mean reward %s  failed %s", name, dim["scored"],
                     f"{dim['mean_reward']:.3f}" if dim["mean_reward"] is not None else "-", dim["failed"] or 0)


if __name__ == "__main__":
    run_cli(main, "score")
