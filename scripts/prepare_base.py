#!/usr/bin/env python
"""The base step, before stage 1: make the base model that the preset names exist.

model.kind = wan: checks the local diffusers folder in model.path (a missing one fails here, not in a
queued job); tiny: builds the random pipeline in RUN_DIR/models/base (seconds); toy: pre-trains the toy
world's base there (minutes on a CPU; killed, it resumes). Idempotent: a base already there is kept.
Prints, as its last line, the steps slurm/pipeline.sh runs next (the diagnosis first where the preset's
stage 1 targets dimensions=auto).
"""

from __future__ import annotations

import logging
import shutil

from gigavideo.cli import run_cli, setup_logging
from gigavideo.config import load_config
from gigavideo.eval.diagnosis import pipeline_steps
from gigavideo.models.base import prepare_base
from gigavideo.rundir.layout import RunDir

log = logging.getLogger("gigavideo.base")


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Prepare RUN_DIR/models/base (or check --model_path); --overwrite builds a random or toy base again."""
    setup_logging()
    cfg, run = load_config(config, "model", overrides), RunDir(run_dir)
    if overwrite and not cfg.model.path:
        for stale in (run.models / "base", run.models / "base.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    log.info("base model (%s): %s", cfg.model.kind, prepare_base(cfg, run))
    print(" ".join(pipeline_steps(cfg)))


if __name__ == "__main__":
    run_cli(main, "model")
