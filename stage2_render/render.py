#!/usr/bin/env python
"""Stage 2: the frozen base model renders a video for every stage-1 prompt.

Each rank takes a disjoint slice of the keys, writes its own shards and resumes where it stopped
(samples already in a complete shard are skipped; a partial shard is discarded). Every sample
keeps its mp4, its latents and its prompt embeddings; real-caption samples keep their real clip
at the training shape and its latents. Writes RUN_DIR/stage2/.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from gigavideo.cli import pick_device, run_cli, start_stage  # noqa: E402
from gigavideo.distributed import my_slice, rank_and_world  # noqa: E402
from gigavideo.models import base_model_path, load_pipeline  # noqa: E402
from gigavideo.rendering import Renderer, seed_for  # noqa: E402
from gigavideo.schema import (ShardWriter, finish_rank, iter_samples, rank_prefix, read_manifest,  # noqa: E402
                              resume_rank)
from gigavideo.video import VideoError, decode_mp4, encode_mp4  # noqa: E402

log = logging.getLogger("gigavideo.stage2")


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def preflight(cfg, run):
    """Stage 1's output and the base model must exist before any work (or any --overwrite)."""
    read_manifest(run, "stage1")
    return base_model_path(cfg.model, run)


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Render every stage-1 prompt with the frozen base model into RUN_DIR/stage2 (e.g. --steps=50 --model_path=/models/wan)."""
    started = start_stage("stage2", "render", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, model_path = started
    rank, world = rank_and_world()
    out = run.stage("stage2")
    done = resume_rank(out, rank)
    samples = {s["__key__"]: s for s in iter_samples(run, "stage1")}
    todo = [k for k in my_slice(list(samples), rank, world) if k not in done]
    log.info("stage2: %d samples in stage1, %d for this rank still to render", len(samples), len(todo))

    device = pick_device(cfg.model.device)
    pipe = load_pipeline(model_path, cfg.model.dtype, device)
    renderer = Renderer(pipe, cfg.render, cfg.model.max_sequence_length, device)
    settings = renderer.settings()
    model_id = {"path": str(model_path), "dtype": cfg.model.dtype}
    failures, seconds_total = [], 0.0
    synthetic = [k for k in todo if samples[k]["json"]["source"] == "synthetic"]
    real = [k for k in todo if samples[k]["json"]["source"] == "real"]
    progress = tqdm(total=len(todo), desc=f"render rank {rank}", unit="video", position=rank, dynamic_ncols=True)
    with ShardWriter(out, "stage2", rank_prefix(rank), cfg.render.samples_per_shard) as writer:
        for keys in batches(synthetic, int(cfg.render.batch_size)):
            prompts = [samples[k]["json"]["prompt"] for k in keys]
            seeds = [seed_for(k, cfg.render.seed) for k in keys]
            try:
                results = renderer.render(keys, prompts, seeds)
            except (RuntimeError, ValueError) as err:  # one bad batch must not stop the stage
                log.error("render failed for %s: %s", keys, err)
                failures += [{"key": k, "reason": f"render: {err}"} for k in keys]
                progress.update(len(keys))
                continue
            for key, seed, result in zip(keys, seeds, results):
                seconds_total += result["seconds"]
                meta = samples[key]["json"] | {"seed": seed, "render": settings, "model": model_id,
                                                "seconds": round(result["seconds"], 3)}
                writer.write({"__key__": key, "json": meta, "mp4": encode_mp4(result["frames"], cfg.render.fps),
                              "latents.npy": result["latents"], "prompt_embeds.npy": result["prompt_embeds"]})
            progress.update(len(keys))
        for key in real:
            start = time.time()
            try:
                frames, _ = decode_mp4(samples[key]["real.mp4"], f"{key} (real video)")
                result = renderer.encode_real(frames, samples[key]["json"]["prompt"])
            except VideoError as err:
                log.error("%s", err)
                failures.append({"key": key, "reason": str(err)})
                progress.update(1)
                continue
            seconds_total += time.time() - start
            meta = samples[key]["json"] | {"seed": None, "render": settings, "model": model_id,
                                            "seconds": round(time.time() - start, 3)}
            writer.write({"__key__": key, "json": meta, "mp4": encode_mp4(result["frames"], cfg.render.fps),
                          "latents.npy": result["latents"], "prompt_embeds.npy": result["prompt_embeds"]})
            progress.update(1)
    progress.close()
    info = {"render": settings, "model": model_id, "failures": failures,
            "device_seconds": {str(rank): round(seconds_total, 2)}}
    if finish_rank(out, "stage2", rank, world, info):
        log.info("stage2 complete: %s", run.manifest("stage2"))
    if failures:
        log.warning("stage2: %d samples failed on this rank (see the manifest); a rerun retries them", len(failures))


if __name__ == "__main__":
    run_cli(main, "render")
