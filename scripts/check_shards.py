#!/usr/bin/env python
"""Every sample of a stage that cannot be decoded, one line each, through the schema's one decoding path (what
stage 4 leaves out of training): key, shard, member and reason. Nothing is unpickled.

    python scripts/check_shards.py --run_dir=runs/demo                 # stage 2 (the default)
    python scripts/check_shards.py --run_dir=runs/demo --stage=stage1

Exits 1 when any sample is bad, 0 when all decode. Stage 2's bad samples are rendered again by deleting their
shards and stage2/manifest.json, then rerunning stage 2 without --overwrite: it renders what those shards held
(each sample from its own seed) and keeps every other shard.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gigavideo.cli import run_cli
from gigavideo.errors import UserError
from gigavideo.rundir.layout import STAGE_SCRIPTS, RunDir
from gigavideo.rundir.shards import iter_samples


def main(run_dir: str = "runs/demo", stage: str = "stage2") -> None:
    folder = Path(run_dir)
    if folder.name in STAGE_SCRIPTS and not (folder / folder.name).is_dir():
        raise UserError(
            f"{folder} is a stage's folder; --run_dir is the run directory: --run_dir={folder.parent} "
            f"--stage={folder.name}"
        )
    bad = []
    good = sum(1 for _ in iter_samples(RunDir(run_dir), stage, on_error=bad.append))
    for err in bad:
        print(f"{err.key}\t{err.shard}\t{err.member} {err.reason}")
    print(f"{stage}: {good} samples decode, {len(bad)} do not", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    run_cli(main)
