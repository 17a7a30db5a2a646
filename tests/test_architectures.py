"""The real models' shapes, checked without their weights: the architecture configs shipped in
configs/architectures/ build on the meta device with the released parameter counts, each preset
describes its model and its latents at the preset's resolution, and a folder holding another model
(transformer, VAE or family) is refused before any compute, naming both."""

import json
import shutil

import pytest
import torch
from conftest import REPO

from gigavideo.config import load_config
from gigavideo.models.base import base_model_path
from gigavideo.models.families import family_for
from gigavideo.models.pipeline import ARCHITECTURE_KEYS, latent_shape, transformer_parameters, vae_architecture
from gigavideo.rundir.layout import RunDir

ARCHITECTURES = REPO / "configs" / "architectures"
# Parameters of the released checkpoints, per transformer (Wan2.2-A14B: each of its two experts).
RELEASED = {"wan2.1-t2v-1.3b": 1.42e9, "wan2.1-t2v-14b": 14.29e9, "wan2.2-ti2v-5b": 5.00e9, "wan2.2-t2v-a14b": 14.29e9}
# (channels, frames, height, width) of the latents at each preset's resolution: 832x480x81 for the
# paper's 1.3B, 1280x720x81 for the 14B models, 1280x704x121 for TI2V-5B (its VAE compresses 4x16x16).
LATENTS = {
    "wan2.1-t2v-1.3b": (16, 21, 60, 104),
    "wan2.1-t2v-14b": (16, 21, 90, 160),
    "wan2.2-ti2v-5b": (48, 31, 44, 80),
    "wan2.2-t2v-a14b": (16, 21, 90, 160),
}


def transformer_configs(name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((ARCHITECTURES / name).glob("transformer*/config.json"))]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_each_real_transformer_builds_on_the_meta_device_with_the_released_parameter_count(name):
    configs = transformer_configs(name)
    assert len(configs) == (2 if name.endswith("a14b") else 1)
    for config in configs:
        count = transformer_parameters(config)
        assert abs(count / RELEASED[name] - 1) < 0.03, (name, count)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_a_preset_describes_its_model_and_the_latent_shape_at_its_resolution(name):
    """The preset (same name) takes the shipped configs, and on the meta device its VAE encodes a video
    of the preset's size to the latents we expect, which its transformer maps to the same shape."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    cfg = load_config(name, "render")
    family = family_for(cfg.model)
    family.check_folder(ARCHITECTURES / name, cfg.preset)  # transformer(s), VAE and family all agree
    arch = cfg.model.arch_transformer
    for shipped in transformer_configs(name):
        assert {k: arch[k] for k in ARCHITECTURE_KEYS} == {k: shipped[k] for k in ARCHITECTURE_KEYS}
    vae_config = json.loads((ARCHITECTURES / name / "vae" / "config.json").read_text())
    assert vae_architecture(cfg.model.arch_vae) == vae_architecture(vae_config)
    size = (cfg.render.height, cfg.render.width, cfg.render.num_frames)
    assert latent_shape(vae_config, *size) == LATENTS[name]
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(vae_config)
        video = torch.empty(1, 3, cfg.render.num_frames, cfg.render.height, cfg.render.width)
        latents = vae.encode(video).latent_dist.mode()
        transformer = WanTransformer3DModel(**{**arch, "patch_size": tuple(arch["patch_size"])})
        prediction = transformer(
            hidden_states=latents,
            timestep=family.transformer_timestep(torch.empty(1), latents),
            encoder_hidden_states=torch.empty(1, cfg.model.max_sequence_length, arch["text_dim"]),
            return_dict=False,
        )[0]
    assert tuple(latents.shape[1:]) == tuple(prediction.shape[1:]) == LATENTS[name]


def model_folder(tmp_path, name: str, vae_of: str | None = None):
    """A folder that is the named model as far as its configs go (optionally with another model's VAE)."""
    folder = tmp_path / name
    shutil.copytree(ARCHITECTURES / name, folder)
    if vae_of:
        shutil.copy(ARCHITECTURES / vae_of / "vae" / "config.json", folder / "vae" / "config.json")
    return folder


@pytest.mark.parametrize(
    "folder,vae_of,preset,message",
    [
        # another size: both transformers named, with their parameter counts
        ("wan2.1-t2v-14b", None, "wan2.1-t2v-1.3b", r"40 layers x 40 heads.*14\.29B.*30 layers x 12 heads.*1\.42B"),
        # TI2V-5B's transformer beside Wan2.1's VAE
        ("wan2.2-ti2v-5b", "wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", r"16-channel VAE \(4x8x8.*48-channel VAE \(4x16x16"),
        # the same 14B transformer in another family: Wan2.2-A14B's experts are not Wan2.1-14B
        ("wan2.2-t2v-a14b", None, "wan2.1-t2v-14b", r"boundary_ratio=0\.875.*wan2\.1.*needs None"),
        ("wan2.1-t2v-14b", None, "wan2.2-t2v-a14b", r"boundary_ratio=None.*wan2\.2-a14b.*needs 0\.875"),
        ("wan2.2-ti2v-5b", None, "wan2.1-t2v-1.3b", r"expand_timesteps=True.*needs False"),
    ],
)
def test_a_model_folder_that_is_not_the_presets_model_is_refused_before_any_compute_naming_both(
    tmp_path, folder, vae_of, preset, message
):
    path = model_folder(tmp_path, folder, vae_of)
    cfg = load_config(preset, "render", {"model_path": str(path)})
    with pytest.raises(ValueError, match=message):
        base_model_path(cfg, RunDir(tmp_path / "run"))
    if vae_of is None:
        cfg = load_config(folder, "render", {"model_path": str(path)})
        assert base_model_path(cfg, RunDir(tmp_path / "run")) == path  # its own preset takes it
