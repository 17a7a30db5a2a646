"""Where everything of a run lives (`RunDir`), and reading a stage's manifest. The layout, the fields of each
stage's shards and the completion rule are written out once, in docs/rundir.md; fields.py owns the schema,
shards.py the shards, completion.py the protocol."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from gigavideo.rundir.fields import SchemaError

log = logging.getLogger("gigavideo.rundir")


STAGES = ("stage1", "stage2", "stage3")


SET_ASIDE = ".set-aside-"  # NAME.set-aside-WHY: kept for inspection, never read by a stage


MANIFEST = "manifest.json"


# The script that produces each stage's output, relative to the repository root.
STAGE_SCRIPTS = {
    "base": "scripts/prepare_base.py",
    "stage1": "stage1_prompts/generate.py",
    "stage2": "stage2_render/render.py",
    "stage3": "stage3_score/score.py",
    "stage4": "stage4_train/train.py",
    "eval": "eval/evaluate.py",
}


class StageNotReady(FileNotFoundError):
    pass


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def stage(self, name: str) -> Path:
        return self.path / name

    def manifest(self, name: str) -> Path:
        return self.stage(name) / MANIFEST

    def is_complete(self, name: str) -> bool:
        return self.manifest(name).is_file()

    @property
    def models(self) -> Path:
        return self.path / "models"

    @property
    def checkpoints(self) -> Path:
        return self.path / "stage4" / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "stage4" / "tensorboard"

    @property
    def export(self) -> Path:
        return self.path / "stage4" / "export"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def round(self, number: int) -> RunDir:
        """Round NUMBER of `ROUNDS=N slurm/pipeline.sh`: a run directory of its own inside this one."""
        return RunDir(self.path / f"round{number}")


def read_manifest(run: RunDir, stage: str) -> dict:
    path = run.manifest(stage)
    if not path.is_file():
        raise StageNotReady(
            f"{stage} has not completed in {run.path} (no {path}); "
            f"run {STAGE_SCRIPTS.get(stage, stage)} --run_dir {run.path} first"
        )
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SchemaError(f"{path} is not readable JSON ({err}); rerun {STAGE_SCRIPTS.get(stage, stage)}") from None
