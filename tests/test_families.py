"""Model families behind one seam: each tiny Wan2.2 preset runs every stage and exports what stock
diffusers loads; Wan2.2-A14B's experts train only on their own side of the boundary, leave the other
expert untouched, and resume exactly."""

import json
import shutil

import pytest
import torch
from conftest import run_stage, scalars, scored, train_and_kill

from gigavideo.models.export import LORA_FILE
from gigavideo.models.pipeline import load_pipeline
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import iter_samples

A14B = "--config=tiny-wan2.2-a14b"
BOUNDARY = 0.875  # the tiny preset's, as the real model's


@pytest.fixture(scope="session")
def scored_a14b(tmp_path_factory):
    return scored(tmp_path_factory.mktemp("a14b") / "run", A14B)


def backends_on(*models) -> set:
    """What diffusers' dispatcher runs for each attention layer of the models: its processor's backend name."""
    return {
        getattr(m.processor._attention_backend, "value", m.processor._attention_backend)
        for model in models
        for m in model.modules()
        if hasattr(getattr(m, "processor", None), "_attention_backend")
    }


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,mode,backend",
    # _native_math runs on a CPU and is not what a model whose backend was never set would run
    [("tiny-wan2.2-5b", "full", "auto"), ("tiny-wan2.2-a14b", "lora", "_native_math")],
)
def test_each_tiny_family_runs_every_stage_and_its_export_generates_in_stock_diffusers(tmp_path, preset, mode, backend):
    from diffusers import WanPipeline

    run_dir, config, attention = tmp_path / "run", f"--config={preset}", f"--attention_backend={backend}"
    run_stage("stage1", run_dir, config)
    run_stage("stage2", run_dir, config, attention)
    run_stage("stage3", run_dir, config)
    run_stage("stage4", run_dir, config, f"--mode={mode}", "--lr=1e-2", attention)
    run_stage("eval", run_dir, config, "--suites=[heldout]", attention)
    run = RunDir(run_dir)
    assert (run.eval / "report.json").is_file()

    # every transformer ran the backend asked for (read back from the loaded models), both experts included
    ran = "native" if backend == "auto" else backend
    assert read_manifest(run, "stage2")["render"]["attention_backend"] == ran
    experts = read_manifest(run, "stage4")["experts"]
    assert len(experts) == (2 if "a14b" in preset else 1)
    assert {e["attention_backend"] for e in experts.values()} == {ran}
    assert json.loads((run.eval / "report.json").read_text())["protocol"]["attention_backend"] == ran
    pipe = load_pipeline(run.models / "base", attention_backend=backend)  # what stage 2 and the eval load
    assert backends_on(*(t for t in (pipe.transformer, pipe.transformer_2) if t is not None)) == {ran}

    vae = json.loads((run.models / "base" / "vae" / "config.json").read_text())
    stored = read_manifest(run, "stage2")["latents"]  # the latent space is stored with the shards
    assert (stored["latents_mean"], stored["latents_std"]) == (vae["latents_mean"], vae["latents_std"])
    sample = next(iter_samples(run, "stage2"))
    assert sample["latents.npy"].shape[0] == stored["channels"] == vae["z_dim"]  # 48 for Wan2.2-TI2V

    base = WanPipeline.from_pretrained(run.models / "base")
    args = dict(prompt="a red square", num_frames=5, height=64, width=64, num_inference_steps=3, output_type="np")
    before = base(**args, generator=torch.Generator().manual_seed(0)).frames
    if mode == "lora":  # one LoRA file per expert, each loaded onto its own transformer
        for component in ("transformer", "transformer_2"):
            assert (run.export / component / LORA_FILE).is_file()
            base.load_lora_weights(run.export / component, load_into_transformer_2=component == "transformer_2")
        tuned = base
    else:
        tuned = WanPipeline.from_pretrained(run.export)
    after = tuned(**args, generator=torch.Generator().manual_seed(0)).frames
    assert after.shape == before.shape and abs(after - before).mean() > 1e-4
    assert backends_on(tuned.transformer) == {None}  # the export carries no backend: stock diffusers' default


@pytest.mark.slow
@pytest.mark.parametrize("expert,other,other_name", [("low", "transformer", "high"), ("high", "transformer_2", "low")])
def test_training_one_expert_leaves_the_other_bit_identical_and_samples_only_its_side(
    scored_a14b, tmp_path, expert, other, other_name
):
    run_dir = tmp_path / "run"
    shutil.copytree(scored_a14b, run_dir)
    run_stage("stage4", run_dir, A14B, f"--expert={expert}", "--lr=1e-2", "--max_steps=6", "--batch_size=2")
    run = RunDir(run_dir)
    trained = "transformer_2" if other == "transformer" else "transformer"
    untouched, base = weights(run.export / other), weights(run.models / "base" / other)
    assert untouched.keys() == base.keys() and all(torch.equal(untouched[k], base[k]) for k in base)
    tuned, before = weights(run.export / trained), weights(run.models / "base" / trained)
    assert not all(torch.equal(tuned[k], before[k]) for k in before)
    t_min = [v for _, v in scalars(run.tensorboard / expert, "timesteps/min")]
    t_max = [v for _, v in scalars(run.tensorboard / expert, "timesteps/max")]
    assert len(t_min) == len(t_max) == 6
    if expert == "low":
        assert max(t_max) < BOUNDARY
    else:
        assert min(t_min) >= BOUNDARY
    assert not (run.checkpoints / other_name).exists() and not (run.tensorboard / other_name).exists()
    assert set(read_manifest(run, "stage4")["experts"]) == {expert}


@pytest.mark.slow
def test_a_killed_and_resumed_two_expert_run_has_the_loss_curves_of_an_uninterrupted_one(scored_a14b, tmp_path):
    args = [A14B, "--batch_size=1", "--epochs=100", "--max_steps=150", "--save_every=10", "--shuffle_buffer=4"]
    args += ["--sample_every=0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for run_dir in (whole, killed):
        shutil.copytree(scored_a14b, run_dir)
    run_stage("stage4", whole, *args)
    train_and_kill(killed, args, RunDir(killed).checkpoints / "low" / "latest", 40)  # in the second expert
    run_stage("stage4", killed, *args)
    for expert in ("high", "low"):
        curve = scalars(RunDir(killed).tensorboard / expert, "train/loss")
        assert curve == scalars(RunDir(whole).tensorboard / expert, "train/loss")
        assert [s for s, _ in curve] == list(range(1, 151))
