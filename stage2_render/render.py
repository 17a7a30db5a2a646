#!/usr/bin/env python
"""Stage 2: the frozen base model renders a video for every stage-1 prompt.

Each rank takes a disjoint slice of the keys, writes its own shards and resumes where it stopped
(samples already in a complete shard are skipped; a partial shard is discarded). Every sample
keeps its mp4, its latents and its prompt embeddings; real-caption samples keep their real clip
at the training shape and its latents. Writes RUN_DIR/stage2/.
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from gigavideo.cli import pick_device, run_cli, start_stage
from gigavideo.distributed import my_share, rank_and_world
from gigavideo.errors import ConfigError
from gigavideo.memory import check_rendering_memory
from gigavideo.models import attention
from gigavideo.models.base import base_model_path, checked_pipeline_folder
from gigavideo.models.families import family_for
from gigavideo.models.pipeline import latent_space, load_pipeline
from gigavideo.models.rendering import (
    CACHES,
    Renderer,
    Samples,
    check_frames,
    fixed_batches,
    models_for_prompts,
    render_batch,
)
from gigavideo.rundir.completion import finish_rank
from gigavideo.rundir.fields import SampleError, decode_video, stage2_arrays
from gigavideo.rundir.files import check_space
from gigavideo.rundir.layout import read_manifest
from gigavideo.rundir.shards import ShardWriter, completed_keys, index_json, iter_samples, rank_prefix, resume_rank
from gigavideo.seeding import derive_seed

log = logging.getLogger("gigavideo.stage2")


def tally(out):
    """finish_rank's count: the samples that failed in this run (a rerun retries them) of those plus the written."""
    return lambda failures: (failures, len(completed_keys(out)) + len(failures))


def preflight(cfg, run):
    """Stage 1's output and the base model must exist before any work (or any --overwrite)."""
    read_manifest(run, "stage1")
    check_frames(cfg.render.num_frames)
    if cfg.render.cache not in CACHES:
        raise ConfigError(f"--cache={cfg.render.cache!r} not in {CACHES}")
    check_rendering_memory(cfg, rank_and_world()[1], log)
    attention.resolve(cfg.model.attention_backend, pick_device(cfg.model.device), cfg.model.dtype)
    if cfg.render.base_share > 0 and not cfg.render.base_path:
        raise ConfigError("--base_share > 0 renders part of the prompts with --base_path's model: set --base_path")
    if cfg.render.base_share > 0:
        checked_pipeline_folder(cfg, cfg.render.base_path)
    return base_model_path(cfg, run)


def render_synthetic(renderer, batches: list[list[str]], done: set, samples: Samples, progress, out, todo: int):
    for number, keys in enumerate(batches):
        seeds = [derive_seed(samples.rc.seed, k) for k in keys]
        prompts = [samples.prompts[k]["prompt"] for k in keys]
        results = render_batch(renderer, keys, prompts, seeds, samples.failures)
        for key, seed, result in zip(keys, seeds, results, strict=True):
            if key in done:
                continue  # rendered again only to keep the batch as it was
            if result is not None:
                samples.write(key, result, seed, result["seconds"])
            progress.update(1)
        # The first batch tells the bytes per sample: warn now if the rest cannot fit.
        writer = samples.writer
        check_space(out, writer.samples_written, writer.bytes_written, todo - progress.n, "stage2", warn=number == 0)


def encode_real(renderer, run, keys: set, samples: Samples, progress) -> None:
    """Real clips at the training shape, with their latents and their captions' embeddings (the realism term)."""
    for sample in iter_samples(run, "stage1", keys=keys) if keys else []:
        key, start = sample["__key__"], time.time()
        try:
            result = renderer.encode_real(decode_video(sample, "real.mp4"), sample["json"]["prompt"])
        except SampleError as err:
            log.error("%s", err)
            samples.failures.append({"key": key, "reason": str(err)})
        else:
            samples.write(key, result, None, time.time() - start)
        progress.update(1)


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Render every stage-1 prompt with the frozen base model into RUN_DIR/stage2.

    e.g. --steps=50 --model_path=/models/wan
    """
    started = start_stage("stage2", "render", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, model_path = started
    rank, world = rank_and_world()
    out, rc = run.stage("stage2"), cfg.render
    done, prompts = resume_rank(out, rank), index_json(run, "stage1")
    mine = my_share(list(prompts), rank, world)
    synthetic = [k for k in mine if prompts[k]["source"] == "synthetic"]
    models = models_for_prompts(synthetic, model_path, rc)  # the last one encodes the real clips too
    batches = {n: [b for b in fixed_batches(keys, rc.batch_size) if set(b) - done] for n, (_, keys) in models.items()}
    real_todo = {k for k in mine if prompts[k]["source"] == "real" and k not in done}
    todo = sum(len(set(b) - done) for bs in batches.values() for b in bs) + len(real_todo)
    log.info("stage2: %d samples in stage1, %d for this rank still to render", len(prompts), todo)
    device = pick_device(cfg.model.device)
    with (
        ShardWriter(out, "stage2", rank_prefix(rank), rc.samples_per_shard) as writer,
        tqdm(total=todo, desc=f"render rank {rank}", unit="video", position=rank, dynamic_ncols=True) as progress,
    ):
        samples, truncated = Samples(writer, prompts, rc), 0
        for name, (path, _) in models.items():  # one model loaded at a time
            if name == "base" and not batches[name]:  # resumed, with the base's share all written
                continue
            pipe = renderer = None  # the previous model's, freed before the next one loads
            pipe = load_pipeline(path, cfg.model.dtype, device, attention_backend=cfg.model.attention_backend)
            family = family_for(cfg.model)
            renderer = Renderer(pipe, family, rc, cfg.model.max_sequence_length, device, cfg.model.flow_shift)
            model = {"path": str(path), "dtype": cfg.model.dtype}
            samples.meta = {"render": renderer.settings(), "model": model, "rendered_by": name}
            render_synthetic(renderer, batches[name], done, samples, progress, out, todo)
            truncated += renderer.truncation()["truncated_prompts"] if name == "base" else 0  # the model's: below
        encode_real(renderer, run, real_todo, samples, progress)
    meta = {"render": renderer.settings(), "model": {"path": str(model_path), "dtype": cfg.model.dtype}}
    if rc.base_share > 0:
        meta["model"] |= {"base_path": rc.base_path, "base_share": rc.base_share}
    space = latent_space(pipe)
    info = meta | {
        "latents": space,
        "arrays": stage2_arrays(space, rc, pipe.transformer.config.text_dim),
        "failures": samples.failures,
        "counts": {"truncated_prompts": truncated + renderer.truncation()["truncated_prompts"]},
        "device_seconds": {str(rank): round(samples.seconds, 2)},
    }
    if finish_rank(out, "stage2", rank, world, info, tally(out), rc.max_failed_fraction):
        log.info("stage2 complete: %s", run.manifest("stage2"))
    if samples.failures:
        log.warning("stage2: %d samples failed on this rank (see the manifest); a rerun retries", len(samples.failures))


if __name__ == "__main__":
    run_cli(main, "render")
