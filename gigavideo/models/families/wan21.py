"""The Wan2.1 family (T2V-1.3B, T2V-14B), and the adapter every other family derives from.

A family adapter owns what differs between model families:
- how a random pipeline is built (tiny presets) and how a local diffusers folder is checked;
- the pipeline's own config (Wan2.2-A14B's expert boundary, TI2V-5B's per-token timesteps);
- the transformer(s) trained, and which timesteps each is trained on (`experts`);
- the timestep the transformer is given, and the sampler's extra arguments.
The latent channels, statistics and compression come from the VAE's own config, and the export layout
from the trained components (gigavideo/models/export.py). Stages, the loss, validation and the eval ask the
adapter; nothing else branches on the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gigavideo.errors import ConfigError
from gigavideo.models.pipeline import check_architecture, check_vae, torch_dtype
from gigavideo.rundir.files import read_json_file
from gigavideo.tiny.tokenizers import build_tiny_tokenizer


@dataclass(frozen=True)
class Expert:
    """A transformer that stage 4 trains: its pipeline component, and the part of t in [0, 1] it sees."""

    name: str  # "" where the family has one transformer; Wan2.2-A14B's: "high" and "low"
    component: str  # "transformer" | "transformer_2"
    t_range: tuple[float, float] = (0.0, 1.0)

    @property
    def label(self) -> str:
        return self.name or self.component

    @property
    def seed_parts(self) -> tuple[str, ...]:
        """What sets this expert's noise apart from another's (nothing where there is one)."""
        return (self.name,) if self.name else ()


class Wan21:
    """One transformer; the 16-channel 4x8x8 VAE; one timestep per sample (t * 1000)."""

    name = "wan2.1"
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, self and cross

    def __init__(self, model_cfg: dict):
        self.model = model_cfg

    # ---------------------------------------------------------------- the pipeline
    def experts(self) -> list[Expert]:
        return [Expert("", "transformer")]

    @property
    def components(self) -> list[str]:
        return [e.component for e in self.experts()]

    def select_experts(self, choice: str) -> list[Expert]:
        """--expert: "both" is every expert (the only one, where there is one)."""
        experts = self.experts()
        if choice == "both":
            return experts
        chosen = [e for e in experts if e.name and e.name == choice]
        if not chosen:
            named = [e.name for e in experts if e.name]
            raise ConfigError(
                f"--expert={choice!r}: family {self.name} has "
                + (f"experts {named} (or both)" if named else "one transformer; leave --expert at both")
            )
        return chosen

    def pipeline_config(self) -> dict:
        """WanPipeline's own config entries (model_index.json) that tell the families apart."""
        return {"boundary_ratio": None, "expand_timesteps": False}

    def build_tiny_pipeline(self, make_vae=None):
        """A random-initialised WanPipeline with the real architecture classes (model.arch_*), sized for CPU.

        make_vae(**arch_vae) builds another VAE in its place (the toy world's pixel VAE); it is called where
        the VAE is built, so the other components' random weights stay those of model.tiny_seed.
        """
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        torch.manual_seed(int(self.model["tiny_seed"]))
        arch = dict(self.model["arch_transformer"])
        arch["patch_size"] = tuple(arch["patch_size"])
        transformer = WanTransformer3DModel(**arch)
        vae = (make_vae or AutoencoderKLWan)(**self.model["arch_vae"])
        tokenizer = build_tiny_tokenizer()
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=arch["text_dim"], **self.model["arch_text_encoder"])
        )
        text_encoder.eval()  # no dropout: embed text here as every later `from_pretrained` copy of it will
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=1000,
            flow_shift=float(self.model["flow_shift"]),
        )
        more = {c: WanTransformer3DModel(**arch) for c in self.components[1:]}  # further experts
        return WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            **more,
            **self.pipeline_config(),
        )

    def check_folder(self, path: Path, preset: str) -> None:
        """Refuse, before any compute, a diffusers folder that is not the model the preset describes."""
        index = read_json_file(path / "model_index.json")
        for key, wanted in self.pipeline_config().items():
            if index.get(key) != wanted:
                raise ConfigError(
                    f"{path}/model_index.json has {key}={index.get(key)!r}, but preset {preset} (model.family = "
                    f"{self.name}) needs {wanted!r}: the folder holds another family's model. Use its preset."
                )
        for component in self.components:
            if not (path / component / "config.json").is_file():
                raise FileNotFoundError(f"{path} has no {component}/config.json, which {self.name} models have")
            check_architecture(path / component, self.model["arch_transformer"], preset)
        check_vae(path / "vae", self.model["arch_vae"], preset)

    def check_video_shape(self, pipe, height: int, width: int, num_frames: int) -> None:
        """Sizes the VAE and the patches divide, and a frame count the VAE compresses whole."""
        temporal = pipe.vae_scale_factor_temporal
        multiple = pipe.vae_scale_factor_spatial * int(self.model["arch_transformer"]["patch_size"][1])
        if height % multiple or width % multiple:
            raise ConfigError(
                f"{width}x{height}: {self.name} needs a width and height that are multiples of {multiple}"
            )
        if (num_frames - 1) % temporal:
            raise ConfigError(f"num_frames={num_frames}: {self.name} needs {temporal}k+1 frames")

    # ---------------------------------------------------------------- training and sampling
    def transformer_timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """What the transformer is given for flow time t in [0, 1] (Wan: t * 1000, one per sample)."""
        return t * 1000

    def modulation_bytes_per_token(self, dim: int) -> int:
        """Activation bytes per token and block beyond a Wan block's usual ones (the memory planner's)."""
        return 0

    def sampler_kwargs(self, render_cfg: dict) -> dict:
        """WanPipeline arguments beyond the common ones."""
        return {}

    def frozen_transformers(self, base_path: Path, trained: str, dtype: str, device) -> dict:
        """The components a sampler needs beside the one being trained, from the base model (frozen)."""
        from diffusers import WanTransformer3DModel

        return {
            c: WanTransformer3DModel.from_pretrained(base_path / c, dtype=torch_dtype(dtype)).to(device).eval()
            for c in self.components
            if c != trained
        }
