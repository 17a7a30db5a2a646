"""The toy world's base model: a tiny Wan pipeline with the pixel VAE, pre-trained by flow matching on
the world's clips, whose captions need not name the shade (that is the weakness fine-tuning fixes).

An explicit step, the base step of `model.kind = "toy"`, run before stage 1 (`make demo` and
`slurm/pipeline.sh` run it):

    python scripts/prepare_base.py --run_dir=runs/demo --config=toy

It writes RUN_DIR/models/base (a diffusers folder, with pretraining.json and the recipe it was built
from). Killed, it resumes from its last checkpoint in RUN_DIR/models/base.partial and ends with the
same weights as an uninterrupted run. With `model.kind = "toy"`, stages find the base here and
refuse to start without it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gigavideo.errors import UserError
from gigavideo.models.base import BaseModelKind
from gigavideo.models.families import family_for
from gigavideo.models.pipeline import check_recipe, model_recipe, normalize_latents, write_recipe
from gigavideo.rundir.files import write_atomic, write_json_atomic
from gigavideo.rundir.layout import RunDir
from gigavideo.toy.clips import make_clip
from gigavideo.toy.config import toy_settings
from gigavideo.toy.vae import pixel_vae
from gigavideo.train.loss import sample_timesteps
from gigavideo.train.step import PlainEngine, flow_matching_step

log = logging.getLogger("gigavideo.toy")
STATE_FILE = "pretrain-state.pt"


def recipe(cfg) -> dict:
    return model_recipe(cfg.model, pretrain=toy_settings(cfg).pretrain)


def toy_base(cfg, run: RunDir) -> Path:
    """model.kind = toy: RUN_DIR/models/base as the pre-training step left it."""
    path = run.models / "base"
    if not (path / "pretraining.json").is_file():
        raise FileNotFoundError(
            f"the toy world's base model is not pre-trained in {path}: run `python scripts/prepare_base.py "
            f"--run_dir={run.path} --config={cfg.preset}` first (make demo and slurm/pipeline.sh run it)"
        )
    return check_recipe(path, recipe(cfg))


def training_set(pipe, pretrain: dict, max_sequence_length: int):
    """The world's clips as normalised latents and their caption embeddings (some dropped to no text)."""
    torch.manual_seed(pretrain["seed"])
    size = (pretrain["height"], pretrain["width"], pretrain["num_frames"])
    clips = [
        make_clip(i, *size, pretrain["seed"], pretrain["caption_rates"], pretrain["size_range"])
        for i in range(pretrain["clips"])
    ]
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([frames for frames, _ in clips])).permute(0, 4, 1, 2, 3) / 127.5 - 1
        latents = torch.cat(
            [
                normalize_latents(pipe.vae.encode(pixels[i : i + 250]).latent_dist.mode(), pipe.vae.config)
                for i in range(0, len(clips), 250)
            ]
        )
        texts = sorted({text for _, text in clips} | {""})  # few distinct captions: embed each once
        table = pipe.encode_prompt(
            texts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device="cpu"
        )[0]
        embeds = table[[texts.index(text) for _, text in clips]]
        empty = table[texts.index("")]
    drop = torch.rand(len(clips)) < pretrain["caption_dropout"]  # so classifier-free guidance has a "no text"
    embeds[drop] = empty
    return latents, embeds


def pretrain_base(
    pipe, pretrain: dict, max_sequence_length: int, flow_shift: float, partial: Path, checkpoint_every: int
) -> dict:
    """Flow-matching pre-training of pipe.transformer; checkpoints in `partial`, resumed from there."""
    latents, embeds = training_set(pipe, pretrain, max_sequence_length)
    model = pipe.transformer.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=pretrain["lr"], weight_decay=0.0)
    steps, batch = pretrain["steps"], pretrain["batch_size"]
    engine = PlainEngine(model, optimizer, clip=1.0, lr_factor=lambda step: 0.55 + 0.45 * np.cos(np.pi * step / steps))
    losses, seconds = [], 0.0
    state_file = partial / STATE_FILE
    if state_file.is_file():  # only tensors and numbers: nothing is unpickled
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        engine.global_steps, losses, seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
        log.info("toy pre-training resumes at step %d/%d from %s", engine.global_steps, steps, state_file)
    began = time.time() - seconds
    ones = torch.ones(batch)
    progress = tqdm(total=steps, initial=engine.global_steps, desc="toy pre-training", unit="step", mininterval=5)
    for step in range(engine.global_steps, steps):  # the stage-4 step, every sample of weight 1, cosine decay to 0.1
        idx = torch.randint(0, len(latents), (batch,))
        t = sample_timesteps(batch, "logit_normal", flow_shift)
        loss, _ = flow_matching_step(engine, latents[idx], embeds[idx], ones, t, torch.randn_like(latents[idx]))
        losses.append(loss.item())
        progress.update(1)
        if step % 100 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step + 1,
                "losses": losses,
                "seconds": time.time() - began,
            }
            write_atomic(state_file, lambda tmp, state=state: torch.save(state, tmp))
    progress.close()
    model.eval()
    return {"steps": steps, "final_loss": float(np.mean(losses[-100:])), "seconds": time.time() - began}


def pretrain(cfg, run: RunDir) -> Path:
    """Build and pre-train the toy base into RUN_DIR/models/base, resuming a killed run."""
    target, partial, wanted = run.models / "base", run.models / "base.partial", recipe(cfg)
    if (target / "pretraining.json").is_file():
        log.info("toy base already pre-trained: %s", target)
        return check_recipe(target, wanted)
    if target.exists():
        raise UserError(f"{target} holds another base model; use another --run_dir, or delete it to pre-train")
    recipe_file = partial / "recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) != wanted:
        log.warning("discarding %s: it was started with other settings", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recipe_file, wanted)
    pipe = family_for(cfg.model).build_tiny_pipeline(make_vae=pixel_vae)
    settings = toy_settings(cfg).pretrain
    summary = pretrain_base(
        pipe,
        settings,
        cfg.model.max_sequence_length,
        cfg.model.flow_shift,
        partial,
        int(toy_settings(cfg).checkpoint_every),
    )

    def save(directory):
        pipe.save_pretrained(directory)
        write_json_atomic(Path(directory) / "pretraining.json", {**settings, **summary})
        write_recipe(directory, wanted)

    write_atomic(target, save)
    shutil.rmtree(partial)
    log.info("toy base pre-trained in %.0f s (final loss %.4f): %s", summary["seconds"], summary["final_loss"], target)
    return target


def check_toy_folder(cfg, path: Path) -> None:
    check_recipe(path, recipe(cfg), required=True)


TOY_BASE = BaseModelKind(
    find=toy_base, prepare=pretrain, check=check_toy_folder
)  # model.kind = "toy" (gigavideo.models.base.BASE_MODELS)
