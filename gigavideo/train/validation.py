"""Validation videos during training: fixed stage-2 prompts rendered by the model being trained.

They are sampled by stage 2's `Renderer`, with the sample's own stage-2 seed and the render settings of the run
(flow shift, frames, size) but no classifier-free guidance and --sample_steps steps: at step 0 a validation video
is what stage 2 rendered at guidance 1, so what changes later is what training changed.

Every rank runs the sampler (under ZeRO-3 each forward gathers parameters from all ranks); rank 0
decodes, logs the videos to TensorBoard as animated GIFs tagged with their key and prompt, and logs drift
monitors (brightness, contrast, saturation, motion) so that reward hacking shows up while training runs. Prompt
embeddings come from the stage-2 shards, so no text encoder is loaded; the VAE is loaded only
when validation is on.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from gigavideo.models import attention
from gigavideo.models.pipeline import decode_latents, pad_prompt_embeds
from gigavideo.models.rendering import Renderer
from gigavideo.rundir.shards import index_json, iter_samples
from gigavideo.rundir.video import gif_bytes, video_statistics
from gigavideo.train.loop import compute_dtype

log = logging.getLogger("gigavideo.train.validation")


class Validation:
    """Samples with the transformer being trained in its pipeline slot (`component`); a family with more
    transformers gets the others from the base model, frozen."""

    def __init__(self, run, base_path, family, component: str, cfg, device, rank: int):
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

        readable = index_json(run, "stage2", on_error=lambda err: None)  # stage 4 names the unreadable ones
        synthetic = sorted(k for k, m in readable.items() if m["source"] == "synthetic")
        chosen = set(synthetic[: cfg.train.sample_count])
        samples = iter_samples(run, "stage2", keys=chosen, on_error=lambda err: log.warning("validation: %s", err))
        self.samples = sorted(samples, key=lambda s: s["__key__"])
        self.fps, self.device, self.rank = cfg.render.fps, device, rank
        self.max_sequence_length = cfg.model.max_sequence_length
        self.family, self.component = family, component
        self.frozen = family.frozen_transformers(base_path, component, cfg.model.dtype, device)
        if self.frozen:  # the trained transformer already runs the backend stage 4 set; the frozen expert joins it
            attention.use(self.frozen.values(), cfg.model.attention_backend, device, compute_dtype(cfg.train))
        scheduler_config = UniPCMultistepScheduler.load_config(base_path / "scheduler")
        self.scheduler_config = {**scheduler_config, "flow_shift": float(cfg.model.flow_shift)}  # as stage 2 samples
        self.vae = AutoencoderKLWan.from_pretrained(base_path / "vae").to(device).eval() if rank == 0 else None
        vae_config = AutoencoderKLWan.load_config(base_path / "vae")  # every rank samples, only rank 0 decodes
        self.spatial = int(vae_config.get("scale_factor_spatial") or 8)
        self.temporal = int(vae_config.get("scale_factor_temporal") or 4)
        self.render_cfg = {
            **cfg.render,
            "steps": cfg.train.sample_steps,
            "guidance_scale": 1.0,  # no negative prompt without the text encoder
            "guidance_scale_2": 1.0,
            "cache": "none",
        }
        if self.samples:  # stage 2 rendered every clip at one shape: the latents' says which
            _, t, h, w = self.samples[0]["latents.npy"].shape
            self.render_cfg |= {"height": h * self.spatial, "width": w * self.spatial}
            self.render_cfg["num_frames"] = (t - 1) * self.temporal + 1

    def renderer(self, transformer) -> Renderer:
        """Stage 2's sampler around `transformer` (and the frozen others), without text encoder or VAE."""
        from diffusers import UniPCMultistepScheduler, WanPipeline

        pipe = WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            scheduler=UniPCMultistepScheduler.from_config(self.scheduler_config),
            **{c: frozen.to(transformer.dtype) for c, frozen in self.frozen.items()},
            **{self.component: transformer},
            **self.family.pipeline_config(),
        )
        pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal = self.spatial, self.temporal
        pipe.set_progress_bar_config(disable=True)
        return Renderer(pipe, self.family, self.render_cfg, self.max_sequence_length, self.device)

    @torch.no_grad()
    def latents(self, transformer) -> list[torch.Tensor]:
        """Each validation prompt's latents, sampled by `transformer` from the prompt's stage-2 seed."""
        renderer = self.renderer(transformer)
        was_training = transformer.training
        transformer.eval()
        out = []
        for sample in self.samples:
            embeds = pad_prompt_embeds(sample["prompt_embeds.npy"], self.max_sequence_length)
            embeds = torch.from_numpy(embeds)[None].to(self.device, transformer.dtype)
            out.append(renderer.sample(embeds, None, [int(sample["json"]["seed"])]))
        transformer.train(was_training)
        return out

    def run(self, transformer, writer, step: int) -> None:
        stats = []
        for sample, latents in zip(self.samples, self.latents(transformer), strict=True):
            if self.rank == 0:
                frames = decode_latents(self.vae, latents.float())[0]
                stats.append(video_statistics(frames))
                if writer is not None:
                    _add_gif(writer, sample_tag(sample["__key__"], sample["json"]["prompt"]), frames, self.fps, step)
        if writer is not None and stats:
            for name in stats[0]:
                writer.add_scalar(f"drift/{name}", float(np.mean([s[name] for s in stats])), step)


def sample_tag(key: str, prompt: str, length: int = 100) -> str:
    """A validation video's TensorBoard tag: its key, then its prompt (the images dashboard shows only the tag)."""
    prompt = " ".join(prompt.split())
    return f"samples/{key}: {prompt if len(prompt) <= length else prompt[: length - 3] + '...'}"


def _add_gif(writer, tag: str, frames: np.ndarray, fps: int, step: int) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(
        height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=gif_bytes(frames, fps)
    )
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
