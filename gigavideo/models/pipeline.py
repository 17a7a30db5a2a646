"""Model helpers every family shares: tokenizers built offline, architecture checks of a model folder
against a preset, loading a pipeline folder, latent normalisation. Which base model a run uses is
gigavideo/models/base.py's; what differs between model families is gigavideo/models/families/'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gigavideo.errors import ConfigError
from gigavideo.rundir.files import read_json_file

WAN_DOWNLOAD_HINT = (
    "Download the diffusers-format weights, e.g. `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers "
    "--local-dir /models/Wan2.1-T2V-1.3B-Diffusers` on a machine with internet, copy the folder to the "
    "cluster, and pass --model_path=/models/Wan2.1-T2V-1.3B-Diffusers (it must contain model_index.json, "
    "transformer/, vae/, text_encoder/, tokenizer/, scheduler/; Wan2.2-A14B also transformer_2/)."
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} not in {sorted(DTYPES)}")
    return DTYPES[name]


def check_model_dir(path: str | Path, what: str, required: tuple[str, ...], hint: str) -> Path:
    path = Path(path).expanduser()
    missing = [r for r in required if not (path / r).exists()]
    if missing:
        raise FileNotFoundError(f"{what} not found at {path} (missing {missing}). {hint}")
    return path


# What a random base model is built from; a run directory's cached copy must match them.
RECIPE_KEYS = (
    "kind",
    "family",
    "boundary_ratio",
    "tiny_seed",
    "flow_shift",
    "max_sequence_length",
    "arch_transformer",
    "arch_vae",
    "arch_text_encoder",
)
RECIPE_FILE = "tiny_recipe.json"


def model_recipe(model_cfg: dict, **extra) -> dict:
    return json.loads(json.dumps({**{k: model_cfg.get(k) for k in RECIPE_KEYS}, **extra}, sort_keys=True))


def write_recipe(directory: Path, recipe: dict) -> None:
    (Path(directory) / RECIPE_FILE).write_text(json.dumps(recipe, indent=1, sort_keys=True))


def check_recipe(path: Path, recipe: dict, required: bool = False) -> Path:
    """A cached random model must have been built from this run's settings (required: and say so)."""
    built = path / RECIPE_FILE
    if required and not built.is_file():
        raise ConfigError(
            f"{path} has no {RECIPE_FILE}: it is not a model this preset's model.kind builds (nor a fine-tuned "
            'export of one); set model.kind = "wan" for a real model\'s folder'
        )
    if built.is_file() and json.loads(built.read_text()) != recipe:
        raise ConfigError(
            f"{path} was built from other model settings ({built}) than this run's preset asks for; "
            f"use another --run_dir, or delete {path} to rebuild it"
        )
    return path


# What makes two transformers different models (the rest of a config may differ between releases).
ARCHITECTURE_KEYS = (
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "ffn_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "patch_size",
)


def transformer_parameters(arch: dict) -> int:
    """The parameter count of a WanTransformer3DModel built on the meta device (no memory, no weights)."""
    from diffusers import WanTransformer3DModel

    arch = {k: tuple(v) if k == "patch_size" else v for k, v in arch.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = WanTransformer3DModel(**arch)
    return sum(p.numel() for p in model.parameters())


def describe_architecture(arch: dict) -> str:
    return (
        f"{arch['num_layers']} layers x {arch['num_attention_heads']} heads x {arch['attention_head_dim']}, "
        f"ffn {arch['ffn_dim']}, {arch['in_channels']} latent channels "
        f"({transformer_parameters(arch) / 1e9:.2f}B parameters)"
    )


def check_architecture(folder: Path, expected: dict, preset: str) -> None:
    """Refuse, before any compute, a transformer folder that is not the model the preset describes."""
    found = read_json_file(folder / "config.json")
    differ = [k for k in ARCHITECTURE_KEYS if k in expected and json.dumps(expected[k]) != json.dumps(found.get(k))]
    if differ:
        raise ConfigError(
            f"{folder} holds a transformer of {describe_architecture(found)}, but preset {preset} describes "
            f"{describe_architecture(expected)} (model.arch_transformer; they differ in {', '.join(differ)}). "
            "Use the preset of that model (configs/*.toml), or the folder of this one."
        )


# What makes two Wan VAEs different (Wan2.1's 16-channel 4x8x8 one and Wan2.2's 48-channel 4x16x16 one).
VAE_ARCHITECTURE_KEYS = (
    "z_dim",
    "base_dim",
    "decoder_base_dim",
    "is_residual",
    "patch_size",
    "scale_factor_spatial",
    "scale_factor_temporal",
)


def vae_architecture(config: dict) -> dict:
    """The VAE_ARCHITECTURE_KEYS of an AutoencoderKLWan config, AutoencoderKLWan's defaults filled in."""
    import inspect

    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return {k: config.get(k, params[k].default) for k in VAE_ARCHITECTURE_KEYS}


def describe_vae(arch: dict) -> str:
    arch = vae_architecture(arch)
    compression = f"{arch['scale_factor_temporal']}x{arch['scale_factor_spatial']}x{arch['scale_factor_spatial']}"
    return f"a {arch['z_dim']}-channel VAE ({compression}, base_dim {arch['base_dim']})"


def check_vae(folder: Path, expected: dict, preset: str) -> None:
    """Refuse, before any compute, a VAE folder that is not the VAE the preset describes."""
    found = vae_architecture(read_json_file(folder / "config.json"))
    wanted = vae_architecture(expected)
    differ = [k for k in VAE_ARCHITECTURE_KEYS if json.dumps(found[k]) != json.dumps(wanted[k])]
    if differ:
        raise ConfigError(
            f"{folder} holds {describe_vae(found)}, but preset {preset} describes {describe_vae(wanted)} "
            f"(model.arch_vae; they differ in {', '.join(differ)}). Use the preset of that model, or its folder."
        )


def latent_shape(vae_config: dict, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of the latents of a video of this size, from the VAE's config."""
    spatial, temporal = vae_config.get("scale_factor_spatial", 8), vae_config.get("scale_factor_temporal", 4)
    return (vae_config.get("z_dim", 16), (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def latent_space(pipe) -> dict:
    """What the stored latents are: channels, compression, and the statistics they were normalised with."""
    vae = pipe.vae.config
    return {
        "channels": len(vae.latents_mean),
        "spatial": pipe.vae_scale_factor_spatial,
        "temporal": pipe.vae_scale_factor_temporal,
        "latents_mean": list(vae.latents_mean),
        "latents_std": list(vae.latents_std),
    }


def load_pipeline(
    path: str | Path,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    transformer_path=None,
    attention_backend: str = "auto",
):
    """Stock `WanPipeline.from_pretrained`, its transformers set to `attention_backend` (gigavideo/models/attention.py);
    optionally with a fine-tuned transformer folder swapped in."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from gigavideo.models import attention

    attention.resolve(attention_backend, device, dtype)  # before loading: a backend that cannot run fails fast
    kwargs = {}
    if transformer_path is not None:
        kwargs["transformer"] = WanTransformer3DModel.from_pretrained(transformer_path, dtype=torch_dtype(dtype))
    pipe = WanPipeline.from_pretrained(str(path), dtype=torch_dtype(dtype), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    attention.use(attention.pipeline_transformers(pipe), attention_backend, device, dtype)
    return pipe.to(device)


def pad_prompt_embeds(embeds: np.ndarray, max_sequence_length: int) -> np.ndarray:
    """Stored text embeddings (tokens, dim) -> (max_sequence_length, dim) float32, zero-padded as WanPipeline does."""
    padded = np.zeros((max_sequence_length, embeds.shape[1]), dtype=np.float32)
    kept = embeds[:max_sequence_length]
    padded[: len(kept)] = kept
    return padded


def latent_stats(vae_config, device, dtype):
    mean = torch.tensor(vae_config.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae_config.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


def normalize_latents(raw, vae_config):
    """VAE latents -> the diffusion space WanPipeline samples in (what `output_type="latent"` returns)."""
    mean, std = latent_stats(vae_config, raw.device, raw.dtype)
    return (raw - mean) / std


def denormalize_latents(latents, vae_config):
    mean, std = latent_stats(vae_config, latents.device, latents.dtype)
    return latents * std + mean


@torch.no_grad()
def encode_video(vae, frames_uint8, device) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised latents (C, T', H/8, W/8), the mode of the posterior."""
    x = torch.from_numpy(frames_uint8).to(device=device, dtype=vae.dtype)
    x = x.permute(3, 0, 1, 2).unsqueeze(0) / 127.5 - 1.0
    return normalize_latents(vae.encode(x).latent_dist.mode(), vae.config)[0]


@torch.no_grad()
def decode_latents(vae, latents) -> numpy.ndarray:  # noqa: F821
    """normalised latents (B, C, T, H, W) -> uint8 frames (B, T, H, W, 3)."""
    video = vae.decode(denormalize_latents(latents.to(vae.dtype), vae.config), return_dict=False)[0]
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()
