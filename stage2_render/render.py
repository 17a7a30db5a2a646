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
from gigavideo.distributed import my_slice, rank_and_world
from gigavideo.errors import ConfigError
from gigavideo.memory import check_rendering_memory
from gigavideo.models import attention
from gigavideo.models.base import base_model_path
from gigavideo.models.families import family_for
from gigavideo.models.pipeline import latent_space, load_pipeline
from gigavideo.models.rendering import CACHES, Renderer, check_frames
from gigavideo.rundir.completion import finish_rank
from gigavideo.rundir.fields import SampleError, decode_video, stage2_arrays
from gigavideo.rundir.files import check_space
from gigavideo.rundir.layout import read_manifest
from gigavideo.rundir.shards import ShardWriter, completed_keys, index_json, iter_samples, rank_prefix, resume_rank
from gigavideo.rundir.video import encode_mp4
from gigavideo.seeding import derive_seed

log = logging.getLogger("gigavideo.stage2")


def fixed_batches(keys: list[str], size: int) -> list[list[str]]:
    """Batches cut from the rank's whole slice, so a resumed run batches every key as before
    (and so renders it bit-identically)."""
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def render_batch(renderer, keys, prompts, seeds, failures) -> list[dict | None]:
    """A batch; if it fails, each sample alone, so one bad sample fails only itself."""
    try:
        return renderer.render(keys, prompts, seeds)
    except (RuntimeError, ValueError) as err:
        if len(keys) == 1:
            log.error("render failed for %s: %s", keys[0], err)
            failures.append({"key": keys[0], "reason": f"render: {err}"})
            return [None]
        log.warning("batch %s failed (%s); rendering its samples one by one", keys, err)
        one_by_one = zip(keys, prompts, seeds, strict=True)
        return [render_batch(renderer, [k], [p], [s], failures)[0] for k, p, s in one_by_one]


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
    return base_model_path(cfg, run)


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Render every stage-1 prompt with the frozen base model into RUN_DIR/stage2.

    e.g. --steps=50 --model_path=/models/wan
    """
    started = start_stage("stage2", "render", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, model_path = started
    rank, world = rank_and_world()
    out = run.stage("stage2")
    done = resume_rank(out, rank)
    prompts = index_json(run, "stage1")
    mine = my_slice(list(prompts), rank, world)
    synthetic_batches = [
        b
        for b in fixed_batches([k for k in mine if prompts[k]["source"] == "synthetic"], int(cfg.render.batch_size))
        if set(b) - done
    ]
    real_todo = {k for k in mine if prompts[k]["source"] == "real" and k not in done}
    todo = sum(len(set(b) - done) for b in synthetic_batches) + len(real_todo)
    log.info("stage2: %d samples in stage1, %d for this rank still to render", len(prompts), todo)

    device = pick_device(cfg.model.device)
    renderer = Renderer(
        load_pipeline(model_path, cfg.model.dtype, device, attention_backend=cfg.model.attention_backend),
        family_for(cfg.model),
        cfg.render,
        cfg.model.max_sequence_length,
        device,
        flow_shift=cfg.model.flow_shift,
    )
    settings = renderer.settings()
    model_id = {"path": str(model_path), "dtype": cfg.model.dtype}
    failures, seconds_total = [], 0.0

    def write(writer, key, result, seed, seconds):
        meta = prompts[key] | {"seed": seed, "render": settings, "model": model_id, "seconds": round(seconds, 3)}
        mp4 = encode_mp4(result["frames"], cfg.render.fps, cfg.render.pix_fmt)
        writer.write(
            {
                "__key__": key,
                "json": meta,
                "mp4": mp4,
                "latents.npy": result["latents"],
                "prompt_embeds.npy": result["prompt_embeds"],
            }
        )

    progress = tqdm(total=todo, desc=f"render rank {rank}", unit="video", position=rank, dynamic_ncols=True)
    with ShardWriter(out, "stage2", rank_prefix(rank), cfg.render.samples_per_shard) as writer:
        for number, keys in enumerate(synthetic_batches):
            seeds = [derive_seed(cfg.render.seed, k) for k in keys]
            results = render_batch(renderer, keys, [prompts[k]["prompt"] for k in keys], seeds, failures)
            for key, seed, result in zip(keys, seeds, results, strict=False):
                if key in done:
                    continue  # rendered again only to keep the batch as it was
                if result is not None:
                    seconds_total += result["seconds"]
                    write(writer, key, result, seed, result["seconds"])
                progress.update(1)
            # The first batch tells the bytes per sample: warn now if the rest cannot fit.
            left = todo - progress.n
            check_space(out, writer.samples_written, writer.bytes_written, left, "stage2", warn=number == 0)
        for sample in iter_samples(run, "stage1", keys=real_todo) if real_todo else []:
            key = sample["__key__"]
            start = time.time()
            try:
                result = renderer.encode_real(decode_video(sample, "real.mp4"), sample["json"]["prompt"])
            except SampleError as err:
                log.error("%s", err)
                failures.append({"key": key, "reason": str(err)})
            else:
                seconds_total += time.time() - start
                write(writer, key, result, None, time.time() - start)
            progress.update(1)
    progress.close()
    info = {
        "render": settings,
        "model": model_id,
        "latents": latent_space(renderer.pipe),
        "arrays": stage2_arrays(latent_space(renderer.pipe), cfg.render, renderer.pipe.transformer.config.text_dim),
        "failures": failures,
        "device_seconds": {str(rank): round(seconds_total, 2)},
    }
    if finish_rank(out, "stage2", rank, world, info, tally(out), cfg.render.max_failed_fraction):
        log.info("stage2 complete: %s", run.manifest("stage2"))
    if failures:
        log.warning("stage2: %d samples failed on this rank (see the manifest); a rerun retries them", len(failures))


if __name__ == "__main__":
    run_cli(main, "render")
