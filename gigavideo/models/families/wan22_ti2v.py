"""Wan2.2-TI2V-5B, text-to-video: the 48-channel 4x16x16 Wan2.2 VAE (its own latent statistics come
with its config), and one timestep per latent token (`expand_timesteps`), as the pipeline samples."""

from __future__ import annotations

import torch

from gigavideo.models.families.wan21 import Wan21


class Wan22TI2V(Wan21):
    name = "wan2.2-ti2v"

    def pipeline_config(self) -> dict:
        return {"boundary_ratio": None, "expand_timesteps": True}

    def modulation_bytes_per_token(self, dim: int) -> int:
        """Per-token timesteps make each block's six modulation vectors per token, in float32."""
        return 6 * dim * 4

    def transformer_timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """(batch, tokens): every latent patch gets t * 1000, as WanPipeline does with expand_timesteps."""
        p_t, p_h, p_w = self.model["arch_transformer"]["patch_size"]
        frames, height, width = latents.shape[2:]
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        return (t * 1000)[:, None].expand(len(t), tokens)
