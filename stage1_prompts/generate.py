#!/usr/bin/env python
"""Stage 1: the weakness-targeted prompt data engine.

For each weak dimension, analogous prompts are made from the dimension's seed examples, augmented
into full video prompts, and given a yes/no verification question. Captions of real videos are
mixed in and keep their video, for stage 4's realism constraint. Writes RUN_DIR/stage1/.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gigavideo.cli import run_cli, start_stage  # noqa: E402
from gigavideo.procedural import make_clip  # noqa: E402
from gigavideo.prompts import DIMENSIONS_DIR, load_dimension, template_prompts  # noqa: E402
from gigavideo.schema import ShardWriter, write_manifest  # noqa: E402
from gigavideo.video import VideoError, decode_mp4, encode_mp4  # noqa: E402

log = logging.getLogger("gigavideo.stage1")


def synthetic_samples(cfg):
    for name in cfg.prompts.dimensions:
        dim = load_dimension(name, cfg.prompts.dimensions_dir or DIMENSIONS_DIR)
        prompts = template_prompts(dim, cfg.prompts.per_dimension, cfg.prompts.seed)
        if len(prompts) < cfg.prompts.per_dimension:
            log.warning("%s: only %d distinct prompts (asked for %d)", name, len(prompts), cfg.prompts.per_dimension)
        for i, p in enumerate(prompts):
            yield {"__key__": f"syn-{name}-{i:06d}",
                   "json": {"prompt": p["prompt"], "question": p["question"], "dimension": name,
                            "source": "synthetic", "lineage": p["lineage"],
                            "generator": {"engine": cfg.prompts.engine, "seed": cfg.prompts.seed}}}


def real_caption_pairs(spec: str):
    """(caption, mp4 bytes, origin) from "procedural:N" or a JSONL/CSV file of {caption, video}."""
    if spec.startswith("procedural:"):
        for i in range(int(spec.split(":", 1)[1])):
            frames, caption = make_clip(i)
            yield caption, encode_mp4(frames, fps=8), f"procedural:{i}"
        return
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"real captions file {path} not found (expected JSONL or CSV with caption, video)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f)) if path.suffix == ".csv" else [json.loads(l) for l in f if l.strip()]
    for n, row in enumerate(rows):
        if "caption" not in row or "video" not in row:
            raise ValueError(f"{path} row {n + 1}: needs 'caption' and 'video', has {sorted(row)}")
        video = (path.parent / row["video"]).resolve()
        yield row["caption"], video.read_bytes() if video.is_file() else None, str(video)


def real_samples(cfg, failures: list):
    if not cfg.prompts.real_captions:
        return
    for i, (caption, data, origin) in enumerate(real_caption_pairs(cfg.prompts.real_captions)):
        key = f"real-{i:06d}"
        try:
            if data is None:
                raise VideoError(f"{origin}: file not found")
            decode_mp4(data, origin)  # verify now: a bad real video is dropped here, not in stage 4
        except VideoError as err:
            log.warning("dropping real caption %s: %s", key, err)
            failures.append({"key": key, "reason": str(err)})
            continue
        yield {"__key__": key, "real.mp4": data,
               "json": {"prompt": caption, "question": "", "dimension": "real", "source": "real",
                        "lineage": {"video": origin}, "generator": {"engine": "real_captions"}}}


def preflight(cfg, run) -> None:
    if cfg.prompts.engine != "template":
        raise ValueError(f"prompt engine {cfg.prompts.engine!r} is not available yet; use 'template'")
    for name in cfg.prompts.dimensions:
        load_dimension(name, cfg.prompts.dimensions_dir or DIMENSIONS_DIR)
    spec = cfg.prompts.real_captions
    if spec and not spec.startswith("procedural:") and not Path(spec).is_file():
        raise FileNotFoundError(f"real captions file {spec} not found (expected JSONL or CSV with caption, video)")


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Generate prompts, questions and real-caption pairs into RUN_DIR/stage1 (e.g. --per_dimension=100 --real_captions=pairs.jsonl)."""
    started = start_stage("stage1", "prompts", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, _ = started
    # Stage 1 is cheap and deterministic: a rerun redoes it whole rather than resuming.
    for stale in run.stage("stage1").glob("*.tar*"):
        stale.unlink()
    failures: list = []
    counts: dict = {}
    with ShardWriter(run.stage("stage1"), "stage1", "prompts", cfg.prompts.samples_per_shard) as writer:
        for sample in [*synthetic_samples(cfg), *real_samples(cfg, failures)]:
            writer.write(sample)
            dim = sample["json"]["dimension"]
            counts[dim] = counts.get(dim, 0) + 1
    manifest = write_manifest(run.stage("stage1"), "stage1",
                              {"per_dimension": counts, "failures": failures, "config": dict(cfg.prompts)})
    log.info("stage1: %d samples (%s), %d dropped", manifest["num_samples"], counts, len(failures))


if __name__ == "__main__":
    run_cli(main, "prompts")
