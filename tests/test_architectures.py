"""The real models' shapes, checked without their weights: the architecture configs shipped in
configs/architectures/ build on the meta device with the released parameter counts, the presets
describe the same transformers, and a folder holding another model is refused before any compute."""

import json
import shutil

import pytest
from conftest import REPO

from gigavideo.config import load_config
from gigavideo.models import ARCHITECTURE_KEYS, base_model_path, transformer_parameters
from gigavideo.schema import RunDir

ARCHITECTURES = REPO / "configs" / "architectures"
# Parameters of the released checkpoints, per transformer (Wan2.2-A14B: each of its two experts).
RELEASED = {"wan2.1-t2v-1.3b": 1.42e9, "wan2.1-t2v-14b": 14.29e9, "wan2.2-ti2v-5b": 5.00e9, "wan2.2-t2v-a14b": 14.29e9}


def transformer_configs(name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((ARCHITECTURES / name).glob("transformer*/config.json"))]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_each_real_transformer_builds_on_the_meta_device_with_the_released_parameter_count(name):
    configs = transformer_configs(name)
    assert len(configs) == (2 if name.endswith("a14b") else 1)
    for config in configs:
        count = transformer_parameters(config)
        assert abs(count / RELEASED[name] - 1) < 0.03, (name, count)


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_a_preset_describes_the_transformer_of_its_model(name):
    arch = load_config(name, "render").model.arch_transformer
    shipped = transformer_configs(name)[0]
    assert {k: arch[k] for k in ARCHITECTURE_KEYS} == {k: shipped[k] for k in ARCHITECTURE_KEYS}


def test_a_model_folder_of_another_size_is_refused_before_any_compute_naming_both(tmp_path):
    folder = tmp_path / "Wan2.1-T2V-14B-Diffusers"  # a 14B folder, as far as its configs go
    shutil.copytree(ARCHITECTURES / "wan2.1-t2v-14b", folder)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text("{}")
    cfg = load_config("wan2.1-t2v-1.3b", "render", {"model_path": str(folder)})
    with pytest.raises(ValueError, match=r"40 layers x 40 heads.*14\.29B.*30 layers x 12 heads.*1\.42B"):
        base_model_path(cfg, RunDir(tmp_path / "run"))
    cfg = load_config("wan2.1-t2v-14b", "render", {"model_path": str(folder)})
    assert base_model_path(cfg, RunDir(tmp_path / "run")) == folder  # its own preset takes it
