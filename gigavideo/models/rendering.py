"""Rendering with the frozen base model, shared by stage 2 and eval.

Generation runs with `output_type="latent"` and the latents are decoded once here, so the same
latents that make the mp4 are the ones stage 4 trains on; prompt embeddings are kept too, so
training never loads the text encoder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from gigavideo.distributed import rank_and_world
from gigavideo.errors import ConfigError
from gigavideo.models import attention
from gigavideo.models.pipeline import decode_latents, encode_video
from gigavideo.rundir.shards import ShardWriter
from gigavideo.rundir.video import encode_mp4, resize_crop_sample
from gigavideo.seeding import derive_seed

log = logging.getLogger("gigavideo.render")
SAID: set[str] = set()  # the settings lines logged


def check_frames(num_frames: int) -> None:
    if (num_frames - 1) % 4:
        raise ConfigError(f"num_frames={num_frames}: Wan needs 4k+1 frames (e.g. 9, 17, 33, 81)")


# WanPipeline warns about the rounding on every call when the factor is 1 (its test is num_frames % factor != 1);
# pipeline_num_frames has already accounted for it, so that one message, exactly, is dropped.
ROUNDING_NOTICE = "`num_frames - 1` has to be divisible by 1. Rounding to the nearest number."


def pipeline_num_frames(num_frames: int, temporal_factor: int) -> int:
    """What to pass WanPipeline for `num_frames` output frames. It rounds num_frames to k * factor + 1,
    which for a VAE without temporal compression (factor 1, the toy world's) would add a frame."""
    if temporal_factor == 1:
        logging.getLogger("diffusers.pipelines.wan.pipeline_wan").addFilter(_drop_rounding_notice)
        return num_frames - 1
    return num_frames


def _drop_rounding_notice(record: logging.LogRecord) -> bool:
    return record.getMessage() != ROUNDING_NOTICE


def trim_padding(embeds: torch.Tensor) -> np.ndarray:
    """WanPipeline zero-pads text embeddings to max_sequence_length; store only the real tokens."""
    nonzero = embeds.abs().sum(-1) > 0
    length = int(nonzero.nonzero().max()) + 1 if nonzero.any() else 1
    return embeds[:length].float().cpu().numpy()


CACHES = ("none", "first_block", "taylorseer")


def configure_pipeline(pipe, render_cfg: dict, flow_shift: float, device) -> None:
    """The sampler's shift, memory savers and step caching, as the flags ask."""
    from diffusers import UniPCMultistepScheduler

    if isinstance(pipe.scheduler, UniPCMultistepScheduler):
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=float(flow_shift))
    if render_cfg.get("vae_tiling"):
        pipe.vae.enable_tiling()
    if render_cfg.get("vae_slicing"):
        pipe.vae.enable_slicing()
    if render_cfg.get("cpu_offload"):
        pipe.enable_model_cpu_offload(device=device)
    cache = render_cfg.get("cache", "none")
    if cache not in CACHES:
        raise ConfigError(f"--cache={cache!r} not in {CACHES}")
    if cache == "first_block":
        from diffusers import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=render_cfg["cache_threshold"]))
    elif cache == "taylorseer":
        from diffusers import TaylorSeerCacheConfig

        pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=render_cfg["cache_interval"]))


class Renderer:
    def __init__(
        self, pipe, family, render_cfg: dict, max_sequence_length: int, device, flow_shift: float | None = None
    ):
        check_frames(render_cfg["num_frames"])
        family.check_video_shape(pipe, render_cfg["height"], render_cfg["width"], render_cfg["num_frames"])
        if flow_shift is not None:
            configure_pipeline(pipe, render_cfg, flow_shift, device)
        self.pipe, self.cfg, self.device = pipe, render_cfg, device
        self.sampler_kwargs = family.sampler_kwargs(render_cfg)
        self.max_sequence_length = int(max_sequence_length)
        self.truncated: list[str] = []  # keys of the prompts longer than max_sequence_length
        line = self.describe()
        if rank_and_world()[0] == 0 and line not in SAID:  # once a setting, per process
            SAID.add(line)
            log.info("rendering %s", line)

    def settings(self) -> dict:
        keys = (
            "height",
            "width",
            "num_frames",
            "fps",
            "steps",
            "guidance_scale",
            "negative_prompt",
            "cache",
            "pix_fmt",
        )
        return {k: self.cfg[k] for k in keys} | {
            "flow_shift": getattr(self.pipe.scheduler.config, "flow_shift", None),
            "scheduler": type(self.pipe.scheduler).__name__,
            "max_sequence_length": self.max_sequence_length,
            "attention_backend": attention.registered_in(attention.pipeline_transformers(self.pipe)),
        }

    def describe(self) -> str:
        """One line of the effective settings: resolution, frames, sampler steps, guidance, attention backend."""
        s = self.settings()
        return (
            f"{s['width']}x{s['height']}, {s['num_frames']} frames at {s['fps']} fps, {s['steps']} steps, guidance "
            f"{s['guidance_scale']}, attention {s['attention_backend']}"
        )

    def note_truncated(self, keys: list[str], prompts: list[str]) -> None:
        """The first prompt longer than max_sequence_length is logged; the others are counted (`truncation`)."""
        for key, prompt in zip(keys, prompts, strict=True):
            n = len(self.pipe.tokenizer(prompt, add_special_tokens=True).input_ids)
            if n > self.max_sequence_length:
                if not self.truncated:
                    log.warning(
                        "%s: prompt has %d tokens, truncated to %d (the next ones are counted, not logged)",
                        key,
                        n,
                        self.max_sequence_length,
                    )
                self.truncated.append(key)

    def truncation(self) -> dict:
        """How many prompts were truncated (for the log and the manifest), with the first few keys."""
        if self.truncated:
            log.info(
                "%d prompts were longer than %d tokens and truncated (first: %s)",
                len(self.truncated),
                self.max_sequence_length,
                ", ".join(self.truncated[:3]),
            )
        return {"truncated_prompts": len(self.truncated), "truncated_first": self.truncated[:3]}

    @torch.no_grad()
    def embed(self, prompts: list[str]):
        use_cfg = self.cfg["guidance_scale"] > 1.0
        return self.pipe.encode_prompt(
            prompts,
            negative_prompt=[self.cfg["negative_prompt"]] * len(prompts),
            do_classifier_free_guidance=use_cfg,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )

    @torch.no_grad()
    def sample(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, seeds: list[int]):
        """Latents for text embeddings (padded to max_sequence_length), one noise generator per seed: the one
        sampler of stage 2, the eval and stage 4's validation videos."""
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        return self.pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            height=self.cfg["height"],
            width=self.cfg["width"],
            num_frames=pipeline_num_frames(self.cfg["num_frames"], self.pipe.vae_scale_factor_temporal),
            num_inference_steps=self.cfg["steps"],
            guidance_scale=self.cfg["guidance_scale"],
            generator=generators,
            output_type="latent",
            **self.sampler_kwargs,
        ).frames

    @torch.no_grad()
    def render(self, keys: list[str], prompts: list[str], seeds: list[int]) -> list[dict]:
        """One batch: returns per sample {latents, prompt_embeds, frames, seconds}."""
        self.note_truncated(keys, prompts)
        start = time.time()
        prompt_embeds, negative_embeds = self.embed(prompts)
        latents = self.sample(prompt_embeds, negative_embeds, seeds)
        frames = decode_latents(self.pipe.vae, latents)
        seconds = (time.time() - start) / len(prompts)
        return [
            {
                "latents": latents[i].float().cpu().numpy(),
                "prompt_embeds": trim_padding(prompt_embeds[i]),
                "frames": frames[i],
                "seconds": seconds,
            }
            for i in range(len(prompts))
        ]

    @torch.no_grad()
    def encode_real(self, frames: np.ndarray, caption: str) -> dict:
        """A real clip at the training shape, with its VAE latents and its caption's embeddings."""
        clip = resize_crop_sample(frames, self.cfg["height"], self.cfg["width"], self.cfg["num_frames"])
        latents = encode_video(self.pipe.vae, clip, self.device)
        prompt_embeds, _ = self.pipe.encode_prompt(
            [caption],
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {
            "latents": latents.float().cpu().numpy(),
            "prompt_embeds": trim_padding(prompt_embeds[0]),
            "frames": clip,
        }


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


def from_base(key: str, render_cfg) -> bool:
    """Whether a synthetic prompt is one of the render.base_share that the original base renders (fixed per key)."""
    return derive_seed(render_cfg.seed, "base_share", key) < render_cfg.base_share * 2**63


def models_for_prompts(keys: list[str], model_path: Path, render_cfg) -> dict[str, tuple[Path, list[str]]]:
    """Which model renders which synthetic prompt, in the order to load them: {"model": (model.path, keys)}; with
    render.base_share > 0 and a base_path other than the model (rounds after the first), {"base": (base_path, that
    share of the keys), "model": (model.path, the rest)}."""
    rc = render_cfg
    if rc.base_share == 0 or Path(rc.base_path).resolve() == Path(model_path).resolve():
        return {"model": (model_path, list(keys))}
    chosen = {k: from_base(k, rc) for k in keys}
    base, own = [k for k in keys if chosen[k]], [k for k in keys if not chosen[k]]
    return {"base": (Path(rc.base_path), base), "model": (model_path, own)}


class Samples:
    """Stage 2's samples as they are written: the mp4, the latents and the prompt embeddings with the stage-1
    metadata and how it was rendered; counts the rendering seconds and the failures."""

    def __init__(self, writer: ShardWriter, prompts: dict, render_cfg):
        self.writer, self.prompts, self.rc = writer, prompts, render_cfg
        self.meta: dict = {}  # how the samples written next are rendered: set per model
        self.failures, self.seconds = [], 0.0

    def write(self, key: str, result: dict, seed: int | None, seconds: float) -> None:
        self.seconds += seconds
        self.writer.write(
            {
                "__key__": key,
                "json": self.prompts[key] | {"seed": seed, **self.meta, "seconds": round(seconds, 3)},
                "mp4": encode_mp4(result["frames"], self.rc.fps, self.rc.pix_fmt),
                "latents.npy": result["latents"],
                "prompt_embeds.npy": result["prompt_embeds"],
            }
        )
