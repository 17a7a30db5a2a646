#!/usr/bin/env python
"""Eval: the baseline and the fine-tuned model on the same prompts and seeds, per dimension.

Prompt suites (--suites):
- `heldout`: the template engine with the eval seed; any prompt that is a near-duplicate of a
  training prompt (stage 1's similarity: MiniLM embeddings, or word 3-grams) is left out.
- `vbench2`: VBench-2.0's standard prompts, read from the installed `vbench2` package, 3 videos
  per prompt; its camera-motion and instance expectations go to our specialist scorers.

--diagnose renders and scores the base model alone, before stage 1, on prompts and seeds of its own (not the
eval's, so that the eval's noise does not choose the dimensions it reports on) into RUN_DIR/diagnosis/ and writes
RUN_DIR/diagnosis.json: per dimension the mean reward with its interval and a weakness rank, which stage 1
reads with --dimensions=auto --num_weak=K (gigavideo/eval/diagnosis.py).

Both models render every (prompt, index) with the same seed into VBench-2.0's layout,
`RUN_DIR/eval/videos/{baseline,finetuned}/{suite}/{Dimension}/{prompt[:180]}-{index}.mp4`. The
stage-3 judge (and specialist) scores each saved video, and drift statistics are measured on the
same frames. Where VBench-2.0's evaluator is installed (--official), it scores the vbench2 folders
too. Writes RUN_DIR/eval/report.json, report.md, chart-{suite}.png, gallery.html (the videos side by side:
gigavideo/eval/gallery.py) and TensorBoard scalars.
Resumable: videos are renamed into place when complete and each scored video is appended to
this rank's record file, so a rerun renders and scores only what is missing.
"""

from __future__ import annotations

import logging

from gigavideo.cli import pick_device, run_cli, start_stage
from gigavideo.distributed import my_share, rank_and_world
from gigavideo.errors import UserError
from gigavideo.eval import vbench2
from gigavideo.eval.diagnosis import DIAGNOSIS
from gigavideo.eval.protocol import (
    OFFICIAL,
    SUITES,
    checked_records,
    eval_videos,
    render_and_score,
    write_diagnosis,
    write_report,
)
from gigavideo.eval.report import LABELS, load_records
from gigavideo.judges.judge import check_judge, load_judge
from gigavideo.judges.scoring import detector_for
from gigavideo.memory import check_rendering_memory
from gigavideo.models import attention
from gigavideo.models.base import base_model_path
from gigavideo.models.export import load_exported
from gigavideo.models.pipeline import load_pipeline
from gigavideo.prompts.dimensions import resolve_dimensions
from gigavideo.rundir.completion import finish_rank
from gigavideo.rundir.layout import read_manifest
from gigavideo.rundir.shards import index_json

log = logging.getLogger("gigavideo.eval")


def preflight(cfg, run, diagnose: bool = False):
    """The export (not for --diagnose), the judge, the base model and the suites must exist before any work (or any
    --overwrite)."""
    if not diagnose:
        read_manifest(run, "stage4")
    ev = cfg.eval
    if not ev.suites or set(ev.suites) - set(SUITES):
        raise UserError(f"--suites={ev.suites}: choose from {SUITES}")
    if ev.official not in OFFICIAL:
        raise UserError(f"--official={ev.official!r} not in {OFFICIAL}")
    dims = resolve_dimensions(ev.dimensions, cfg.prompts.dimensions_dir)
    if "vbench2" in ev.suites:
        for dim in dims:
            vbench2.suite_prompts(dim.name, 1)  # the package is installed and knows the dimension
        if ev.official == "on" and (why_not := vbench2.evaluator_available()):
            raise UserError(
                f"--official=on but VBench-2.0's evaluator does not import: {why_not}; install it, or use "
                "--official=auto (scores it where installed) or off"
            )
    check_judge(cfg.score, run)
    attention.resolve(cfg.model.attention_backend, pick_device(cfg.model.device), cfg.model.dtype)
    check_rendering_memory(cfg, rank_and_world()[1], log)
    return dims, base_model_path(cfg, run)


def main(
    run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, diagnose: bool = False, **overrides
):
    """Compare the base model with RUN_DIR/stage4/export into RUN_DIR/eval (e.g. --suites='[heldout,vbench2]').
    --diagnose: the base model alone, before stage 1: its weakness per dimension into RUN_DIR/diagnosis.json."""
    stage = DIAGNOSIS if diagnose else "eval"
    started = start_stage(
        stage, "eval", run_dir, config, overwrite, overrides, lambda cfg, run: preflight(cfg, run, diagnose)
    )
    if started is None:
        return
    cfg, run, (dims, base) = started
    device = pick_device(cfg.model.device)
    training_prompts = [] if diagnose else sorted({m["prompt"] for m in index_json(run, "stage1").values()})
    videos, notes = eval_videos(cfg, dims, training_prompts, diagnosis=diagnose)
    judge = load_judge(cfg.score, run, device)
    detector = detector_for(dims, cfg.score)
    labels = ("baseline",) if diagnose else LABELS
    rank, world = rank_and_world()
    mine = my_share(videos, rank, world, key=lambda v: v["key"])
    records_dir = run.stage(stage) / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    done = {k for k, record in load_records(records_dir).items() if record["reward"] is not None}  # failed: again
    for label in labels:
        todo = [v for v in mine if (label, v["key"]) not in done]
        log.info("%s %s: %d of this rank's %d videos still to render or score", stage, label, len(todo), len(mine))
        if todo:
            pipe = (
                load_pipeline(base, cfg.model.dtype, device, attention_backend=cfg.model.attention_backend)
                if label == "baseline"
                else load_exported(run.export, base, cfg.model.dtype, device, cfg.model.attention_backend)
            )
            records_file = records_dir / f"rank{rank:05d}.jsonl"
            render_and_score(label, pipe, todo, cfg, judge, detector, run.stage(stage), device, records_file)
            del pipe

    def finalize(parts: list[dict]) -> dict:  # one rank, once every rank's videos are scored
        records = checked_records(stage, videos, labels, records_dir, cfg.eval.max_failed_fraction)
        if diagnose:
            return write_diagnosis(cfg, run, videos, records, notes, dims, base, judge)
        return write_report(cfg, run, videos, records, notes, dims, base, judge)

    finish_rank(run.stage(stage), stage, rank, world, {"videos": len(videos)}, finalize=finalize)


if __name__ == "__main__":
    run_cli(main, "eval")
