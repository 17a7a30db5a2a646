#!/usr/bin/env python
"""Stage-2 rendering throughput, every number measured in this one run on this one device.

    python bench/render.py                    # tiny preset on CPU: batch 1 vs batch N, cache vs none

On CPU it renders the same prompts with batch 1, batch N, and batch N with step caching, and
prints samples/s, the ratios, and how far the cached latents moved from the uncached ones. Seconds
per video of the real-size architecture on a GPU are bench/gpu_check.sh's.
"""

from __future__ import annotations

import time

import torch

from gigavideo.cli import run_cli
from gigavideo.config import load_config
from gigavideo.models.families import family_for
from gigavideo.models.rendering import Renderer
from gigavideo.seeding import derive_seed


def bench_tiny(videos: int, batch_size: int, cache: str, steps: int):
    cfg = load_config("tiny", "render", {"steps": steps})
    device = torch.device("cpu")
    keys = [f"bench-{i}" for i in range(videos)]
    prompts = [
        f"A red square moves {d} across a gray background, video {i}."
        for i, d in zip(range(videos), ["left", "right", "up", "down"] * videos, strict=False)
    ]
    seeds = [derive_seed(0, k) for k in keys]

    def run(batch, cache_name):
        pipe = family_for(cfg.model).build_tiny_pipeline()
        pipe.set_progress_bar_config(disable=True)
        renderer = Renderer(
            pipe,
            family_for(cfg.model),
            cfg.render | {"cache": cache_name},
            cfg.model.max_sequence_length,
            device,
            flow_shift=cfg.model.flow_shift,
        )
        renderer.render(keys[:batch], prompts[:batch], seeds[:batch])  # warm-up
        start = time.perf_counter()
        latents = []
        for i in range(0, videos, batch):
            latents += [
                r["latents"] for r in renderer.render(keys[i : i + batch], prompts[i : i + batch], seeds[i : i + batch])
            ]
        return videos / (time.perf_counter() - start), latents

    one, ref = run(1, "none")
    many, batched = run(batch_size, "none")
    cached, with_cache = run(batch_size, cache)
    diff = max(float(abs(a - b).mean() / (abs(a).mean() + 1e-12)) for a, b in zip(batched, with_cache, strict=False))
    print(
        f"device cpu, tiny preset {cfg.render.width}x{cfg.render.height}x{cfg.render.num_frames}, "
        f"{steps} steps, {videos} videos"
    )
    print(f"batch 1:              {one:8.2f} videos/s")
    print(f"batch {batch_size}:              {many:8.2f} videos/s   ({many / one:.2f}x batch 1)")
    print(
        f"batch {batch_size} + {cache} cache: {cached:8.2f} videos/s   ({cached / many:.2f}x no cache; "
        f"latents moved {diff:.2%} relative)"
    )


def main(
    device: str = "cpu",
    videos: int = 8,
    batch_size: int = 4,
    cache: str = "first_block",
    steps: int = 20,
):
    """Print rendering throughput ratios measured in one run (see the module docstring)."""
    bench_tiny(videos, batch_size, cache, steps)


if __name__ == "__main__":
    run_cli(main)
