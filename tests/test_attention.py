"""model.attention_backend: resolved before compute, recorded where the outputs are. That stages 2 and 4 and
the eval set it on both experts of Wan2.2-A14B, and that the export carries none, is checked on the tiny
families' full runs (tests/test_families.py)."""

import json

import pytest
import torch
from conftest import run_stage

from gigavideo.config import ConfigError
from gigavideo.models import attention
from gigavideo.rundir.layout import RunDir, read_manifest


def test_auto_is_native_on_a_cpu_and_a_backend_that_cannot_run_here_names_what_provides_it():
    assert attention.resolve("auto", "cpu", "float32") == attention.resolve("auto", "cpu", "bfloat16") == "native"
    for name, needs in [
        ("xformers", "xformers==0.0.35"),
        ("flash", "flash-attn>=2.6.3"),
        ("_flash_3", "flash-attention/hopper"),
        ("_native_cudnn", "CUDA GPU"),
    ]:
        with pytest.raises(ConfigError, match=f"attention_backend='{name}' cannot run here: .*{needs}"):
            attention.resolve(name, "cpu", "bfloat16")
    with pytest.raises(ConfigError, match="not one of auto, native"):
        attention.resolve("fast", "cpu", "float32")


@pytest.mark.slow
def test_auto_resolves_to_native_and_every_output_records_it(trained_run):
    run = RunDir(trained_run)
    assert read_manifest(run, "stage2")["render"]["attention_backend"] == "native"
    assert read_manifest(run, "stage4")["attention_backend"] == "native"
    report = json.loads((run.eval / "report.json").read_text())
    assert report["protocol"]["attention_backend"] == "native"


@pytest.mark.parametrize("stage,name,package", [("stage2", "xformers", "xformers"), ("stage4", "flash", "flash-attn")])
def test_a_backend_that_cannot_run_here_is_refused_before_any_compute(scored_copy, stage, name, package):
    before = sorted(p.name for p in (scored_copy / "stage2").iterdir())
    proc = run_stage(stage, scored_copy, "--overwrite", f"--attention_backend={name}", check=False)
    assert proc.returncode != 0
    assert f"model.attention_backend='{name}' cannot run here" in proc.stderr and package in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (scored_copy / "stage2").iterdir()) == before  # --overwrite removed nothing
    assert not (scored_copy / "stage4").exists()


def test_a_pipeline_whose_experts_differ_is_reported():
    from diffusers import WanTransformer3DModel

    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8)
    config |= dict(freq_dim=8, ffn_dim=16, num_layers=1, rope_max_seq_len=32)
    one, two = WanTransformer3DModel(**config), WanTransformer3DModel(**config)
    attention.use([one], "native", "cpu", torch.float32)
    assert attention.registered(one) == "native" and attention.registered(two) == "unset"
    with pytest.raises(RuntimeError, match="different attention backends"):
        attention.registered_in([one, two])
