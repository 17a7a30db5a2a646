"""Stage 3's report: per dimension the videos scored, the mean reward, the failures by reason, and a histogram of
the rewards (RUN_DIR/stage3/report.json, rewards-DIMENSION.png)."""

from __future__ import annotations

import logging

import numpy as np

from gigavideo.eval.figures import histogram_png
from gigavideo.rundir.files import write_json_atomic
from gigavideo.rundir.shards import iter_shard

log = logging.getLogger("gigavideo.stage3")


def summarize(run) -> dict:
    """Per dimension: count, mean reward, failures by reason; a histogram PNG of the rewards."""
    summary, rewards = {}, {}
    shards = sorted(run.stage("stage3").glob("*.tar"))  # read before the manifest is written, which comes last
    for record in (sample["json"] for path in shards for sample in iter_shard(str(path), ("json",))):
        dim = summary.setdefault(record["dimension"], {"scored": 0, "failed": {}})
        if record["status"] == "ok":
            dim["scored"] += 1
            rewards.setdefault(record["dimension"], []).append(record["reward"])
        else:
            reason = record["reason"].split(":", 1)[0]
            dim["failed"][reason] = dim["failed"].get(reason, 0) + 1
    for name, dim in summary.items():
        values = rewards.get(name, [])
        dim["mean_reward"] = float(np.mean(values)) if values else None
        if values:
            dim["histogram"] = histogram_png(
                values, run.stage("stage3") / f"rewards-{name}.png", f"{name}: reward of {len(values)} videos"
            )
    return summary


def report(run) -> None:
    """RUN_DIR/stage3/report.json and a histogram of the rewards per dimension, once the stage is complete."""
    summary = summarize(run)
    write_json_atomic(run.stage("stage3") / "report.json", summary)
    for name, dim in sorted(summary.items()):
        mean = f"{dim['mean_reward']:.3f}" if dim["mean_reward"] is not None else "-"
        log.info("%-20s scored %4d  mean reward %s  failed %s", name, dim["scored"], mean, dim["failed"] or 0)
