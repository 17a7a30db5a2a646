#!/usr/bin/env python
"""Stage-2 rendering throughput, every number measured in this one run on this one device.

    python bench/render.py                    # tiny preset on CPU: batch 1 vs batch N, cache vs none
    python bench/render.py --device=cuda      # real-size Wan2.1-1.3B (random weights), 832x480x81, 50 steps

On CPU it renders the same prompts with batch 1, batch N, and batch N with step caching, and
prints samples/s, the ratios, and how far the cached latents moved from the uncached ones. On a
GPU it builds the published Wan2.1-T2V-1.3B architecture with random weights (text embeddings
are random too: the 5.7B-parameter text encoder is not part of what is timed) and reports seconds
per video at the paper's setting.
"""

from __future__ import annotations

import time

import torch

from gigavideo.config import load_config
from gigavideo.families import family_for
from gigavideo.rendering import Renderer, configure_pipeline
from gigavideo.seeding import derive_seed


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def bench_cuda(steps: int, cache: str, frames: int):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    cfg = load_config("wan2.1-t2v-1.3b", "render", {"steps": steps, "num_frames": frames})
    device = torch.device("cuda")
    arch = dict(cfg.model.arch_transformer)
    arch["patch_size"] = tuple(arch["patch_size"])
    transformer = WanTransformer3DModel(**arch).to(device, torch.bfloat16)
    vae = AutoencoderKLWan(**cfg.model.arch_vae).to(device, torch.float32)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=cfg.model.flow_shift,
    )
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    configure_pipeline(pipe, cfg.render | {"cache": cache}, cfg.model.flow_shift, device)
    embeds = torch.randn(1, cfg.model.max_sequence_length, arch["text_dim"], device=device, dtype=torch.bfloat16)
    kwargs = dict(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        height=cfg.render.height,
        width=cfg.render.width,
        num_frames=cfg.render.num_frames,
        guidance_scale=cfg.render.guidance_scale,
    )
    pipe(**kwargs, num_inference_steps=2, output_type="latent")  # warm-up
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    latents = pipe(**kwargs, num_inference_steps=steps, output_type="latent").frames
    sync(device)
    sample = time.perf_counter() - start
    start = time.perf_counter()
    pipe.vae.decode(latents.float(), return_dict=False)
    sync(device)
    decode = time.perf_counter() - start
    print(
        f"device {torch.cuda.get_device_name()}, Wan2.1-1.3B architecture (random weights), "
        f"{cfg.render.width}x{cfg.render.height}x{cfg.render.num_frames}, {steps} steps, CFG, cache={cache}"
    )
    print(
        f"sampling {sample:.1f} s + VAE decode {decode:.1f} s = {sample + decode:.1f} s per video; "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )


def main(
    device: str = "cpu",
    videos: int = 8,
    batch_size: int = 4,
    cache: str = "first_block",
    steps: int = 0,
    frames: int = 81,
):
    """Print rendering throughput ratios measured in one run (see the module docstring)."""
    if device == "cuda":
        bench_cuda(steps or 50, cache, frames)
    else:
        bench_tiny(videos, batch_size, cache, steps or 20)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
