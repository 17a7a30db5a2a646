"""Wan2.2-T2V-A14B: two 14B experts with Wan2.1's architecture and VAE. `transformer` denoises the
high-noise steps (t >= model.boundary_ratio), `transformer_2` the low-noise ones, as WanPipeline does;
stage 4 trains each only on its own side of the boundary (--expert=high|low|both)."""

from __future__ import annotations

from gigavideo.models.families.wan21 import Expert, Wan21


class Wan22A14B(Wan21):
    name = "wan2.2-a14b"

    @property
    def boundary(self) -> float:
        return float(self.model["boundary_ratio"])

    def experts(self) -> list[Expert]:
        return [
            Expert("high", "transformer", (self.boundary, 1.0)),
            Expert("low", "transformer_2", (0.0, self.boundary)),
        ]

    def pipeline_config(self) -> dict:
        return {"boundary_ratio": self.boundary, "expand_timesteps": False}

    def sampler_kwargs(self, render_cfg: dict) -> dict:
        """The low-noise expert's guidance (render.guidance_scale is the high-noise one's)."""
        return {"guidance_scale_2": float(render_cfg["guidance_scale_2"] or render_cfg["guidance_scale"])}
