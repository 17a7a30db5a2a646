"""The contract between stages: run-directory layout, shard fields, manifests.

Run directory (RUN_DIR)::

    models/base/              model.kind tiny or toy: the base pipeline (diffusers format), built by the base
                              step (scripts/prepare_base.py); toy: models/base.partial/ while pre-training
    models/judge/             score.judge = tiny: the random-initialised judge
    stage1/  *.tar + manifest.json   prompts (synthetic, and real captions with their real video)
    stage2/  *.tar + manifest.json   renders: mp4, latents, text embeddings
    stage3/  *.tar + manifest.json   judge scores and rewards
    stage4/checkpoints/      DeepSpeed checkpoints (convert with zero_to_fp32.py); stepNNNNNNN_universal: one
                              converted for a resume with another number of ranks (gigavideo/train/checkpoint.py)
    stage4/tensorboard/      TensorBoard events
    stage4/export/           diffusers pipeline folder (full fine-tune)
    stage4/manifest.json     written after the export
    eval/report.json, eval/report.md, eval/videos/{baseline,finetuned}/...

Shards are plain WebDataset tars (`tar tf` lists `KEY.json KEY.mp4 ...`). Every sample has a
stable `__key__` (no dots) shared by all stages, so stages join exactly by key. A shard is
written as `NAME.tar.tmp` and renamed when complete; `manifest.json` is written last and marks
the stage complete. Fields per stage (`*` = optional):

    stage1: json {prompt, dimension, source, question, lineage, generator}, real.mp4* (source=real)
            (stage1/candidates/ holds the engine's raw output per work unit: json {dimension, unit,
            candidates, dropped}; the final prompts are selected from it once every unit is done)
    stage2: json {prompt, dimension, source, question, seed, render, model, seconds},
            mp4 (rendered video, or the real clip at training shape for source=real),
            latents.npy (normalised VAE latents, C,T,H,W), prompt_embeds.npy (tokens, dim; unpadded)
    stage3: json {status: ok|failed, reason, p_yes, answer, reward, judge}  (synthetic samples only; one that
            stage 2 could not give whole fails with reason "sample: ...", under dimension "unreadable")

A manifest is written only when no more than max_failed_fraction of the stage's samples failed (`check_failed`);
stages 2 and 3 record `samples_failed` of `samples_total`. A name read from a shard (a dimension) joins a path
only when it is letters, digits, '_' and '-' (`is_name`).
"""

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
