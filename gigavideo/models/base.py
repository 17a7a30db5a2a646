"""Which base model a run uses: model.path (a local diffusers folder, checked against the preset before
any compute), else what model.kind builds (tiny: random weights; toy: the toy world's pre-trained base).
A tiny or toy model may be given by path too (a previous round's export): it is checked by its recipe.

Every stage finds the base through `base_model_path`, so a tiny preset goes down the same
`WanPipeline.from_pretrained` path as the real weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gigavideo.models.families import family_for
from gigavideo.models.pipeline import WAN_DOWNLOAD_HINT, check_model_dir, check_recipe, model_recipe, write_recipe
from gigavideo.registry import resolve
from gigavideo.rundir.files import write_atomic
from gigavideo.rundir.layout import RunDir


def local_base(cfg, run: RunDir) -> Path:
    """The diffusers folder in model.path, holding the model the preset describes (checked by model.kind)."""
    if not cfg.model.get("path"):
        raise FileNotFoundError(f"no base model: set --model_path. {WAN_DOWNLOAD_HINT}")
    return checked_pipeline_folder(cfg, cfg.model["path"])


def checked_pipeline_folder(cfg, folder: str) -> Path:
    """A diffusers pipeline folder (model.path, render.base_path) holding the model the preset describes."""
    path = check_model_dir(
        folder, "Wan base model", ("model_index.json", "transformer/config.json", "vae/config.json"), WAN_DOWNLOAD_HINT
    )
    resolve(BASE_MODELS, cfg.model["kind"], "model.kind").check(cfg, path)
    return path


def check_wan_folder(cfg, path: Path) -> None:
    family_for(cfg.model).check_folder(path, cfg.preset)


def tiny_base(cfg, run: RunDir) -> Path:
    """model.kind = tiny: random weights of the real architectures, built once in RUN_DIR/models/base (seconds)."""
    recipe = model_recipe(cfg.model)

    def build(directory):
        pipe = family_for(cfg.model).build_tiny_pipeline()
        pipe.save_pretrained(directory)
        write_recipe(directory, recipe)

    return check_recipe(write_atomic(run.models / "base", build, keep_existing=True), recipe)


def check_tiny_folder(cfg, path: Path) -> None:
    check_recipe(path, model_recipe(cfg.model), required=True)


@dataclass(frozen=True)
class BaseModelKind:
    """How a model.kind gives the base pipeline folder: `find` for every stage (cheap), `prepare` for the
    base step (scripts/prepare_base.py), which may take long (the toy world pre-trains its base), and
    `check` for a folder given in model.path (a real model's, or a previous round's export)."""

    find: Callable[..., Path]
    prepare: Callable[..., Path]
    check: Callable[..., None]


# model.kind -> its BaseModelKind (the toy world registers its own).
BASE_MODELS = {
    "wan": BaseModelKind(find=local_base, prepare=local_base, check=check_wan_folder),
    "tiny": BaseModelKind(find=tiny_base, prepare=tiny_base, check=check_tiny_folder),
    "toy": "gigavideo.toy.pretrain:TOY_BASE",
}


def base_model_path(cfg, run: RunDir) -> Path:
    """The base pipeline folder: model.path when it is set, else what model.kind finds."""
    if cfg.model.get("path"):
        return local_base(cfg, run)
    return resolve(BASE_MODELS, cfg.model["kind"], "model.kind").find(cfg, run)


def prepare_base(cfg, run: RunDir) -> Path:
    """The base step: make the base pipeline folder exist (check model.path, build, pre-train)."""
    if cfg.model.get("path"):
        return local_base(cfg, run)
    return resolve(BASE_MODELS, cfg.model["kind"], "model.kind").prepare(cfg, run)
