"""Stage 4: the objective, ZeRO-2/3 with full and LoRA training, exact resume, exports."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_stage, sample_frames, scalars, train_and_kill

from gigavideo.config import load_config
from gigavideo.models.families import family_for
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.train.loss import batch_loss


def tiny_transformer():
    return family_for(load_config("tiny", "train").model).build_tiny_pipeline().transformer.eval()


def test_the_weighted_loss_equals_a_hand_computation_on_a_fixed_batch():
    model = tiny_transformer()
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 16, 3, 8, 8, generator=gen), torch.randn(3, 16, 3, 8, 8, generator=gen)
    embeds, t = torch.randn(3, 10, 32, generator=gen), torch.tensor([0.1, 0.5, 0.9])
    weights = torch.tensor([0.2, 1.0, 0.0])
    with torch.no_grad():
        loss, per_sample = batch_loss(model, z0, embeds, weights, t, noise)
        hand = 0.0
        for i in range(3):
            z_t = (1 - t[i]) * z0[i] + t[i] * noise[i]
            v = model(
                hidden_states=z_t[None],
                timestep=t[i : i + 1] * 1000,
                encoder_hidden_states=embeds[i : i + 1],
                return_dict=False,
            )[0][0]
            hand += weights[i] * ((v - (noise[i] - z0[i])) ** 2).mean() / 3
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    uniform, _ = batch_loss(model, z0, embeds, torch.ones(3), t, noise)
    z_t = (1 - t.view(-1, 1, 1, 1, 1)) * z0 + t.view(-1, 1, 1, 1, 1) * noise
    with torch.no_grad():
        v = model(hidden_states=z_t, timestep=t * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
    torch.testing.assert_close(uniform, torch.nn.functional.mse_loss(v, noise - z0))  # plain flow matching


def torchrun_stage4(
    run_dir, *args, nproc: int = 2, check: bool = True, launcher: str = "torch.distributed.run"
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    cmd = [
        sys.executable,
        "-m",
        launcher,
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "stage4_train/train.py"),
        f"--run_dir={run_dir}",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_the_global_batch_and_the_epoch_are_the_same_on_one_and_two_processes_and_three_are_refused(
    scored_copy, tmp_path
):
    """The tiny preset's batch is the paper's: global batch 4 and 1 epoch, whatever the number of processes."""
    one = tmp_path / "one"
    shutil.copytree(scored_copy, one)
    flags = ["--sample_every=0", "--save_every=100"]
    run_stage("stage4", one, *flags, small=False)
    torchrun_stage4(scored_copy, *flags)
    batches = [read_manifest(RunDir(run), "stage4")["batch"] for run in (one, scored_copy)]
    samples = batches[0]["samples"]  # the scored synthetic samples and the real ones
    steps = -(-samples // 4)
    for batch, (world, accum) in zip(batches, [(1, 4), (2, 2)], strict=True):
        assert batch == {
            "world_size": world,
            "micro_batch_size": 1,
            "grad_accum": accum,
            "global_batch_size": 4,
            "samples": samples,
            "steps": steps,
            "samples_seen": 4 * steps,
            "epochs": round(4 * steps / samples, 4),
        }
    before = {p: p.stat().st_mtime_ns for p in scored_copy.rglob("*") if ".locks" not in p.parts}
    three = torchrun_stage4(scored_copy, *flags, "--overwrite", nproc=3, check=False, launcher="gigavideo.launch")
    assert three.returncode == 2 and "Traceback" not in three.stderr, three.stderr[-3000:]
    assert three.stderr.rstrip().endswith("launch: the processes stopped on a user error (the message above) (exit 2)")
    assert (
        "error: train.batch_size = 4 (the global batch) cannot be made by 3 processes x micro_batch_size 1: it must "
        "be a multiple of 3; run 1, 2 or 4 processes, or set --batch_size=3 (or 6)" in three.stderr
    )
    assert {p: p.stat().st_mtime_ns for p in scored_copy.rglob("*") if ".locks" not in p.parts} == before


@pytest.mark.slow
@pytest.mark.parametrize("zero,mode", [("zero3", "full"), ("zero2", "lora"), ("zero3", "lora")])
def test_zero_stages_train_and_the_export_loads_in_stock_diffusers_and_changes_the_output(scored_copy, zero, mode):
    from diffusers import WanPipeline

    torchrun_stage4(
        scored_copy,
        f"--ds_config=ds_configs/{zero}.json",
        f"--mode={mode}",
        "--epochs=100",
        "--max_steps=3",
        "--lr=1e-2",
    )
    run = RunDir(scored_copy)
    manifest = read_manifest(run, "stage4")
    assert manifest["world_size"] == 2 and manifest["mode"] == mode and manifest["steps"] == 3
    base = WanPipeline.from_pretrained(run.models / "base")
    before = sample_frames(base)
    if mode == "lora":
        assert (run.export / "pytorch_lora_weights.safetensors").is_file()
        base.load_lora_weights(run.export)
        tuned = base
    else:
        tuned = WanPipeline.from_pretrained(run.export)
    after = sample_frames(tuned)
    assert abs(after - before).mean() > 1e-4
    if mode == "lora" and zero == "zero2":  # the eval loads a LoRA export on the base model
        run_stage("eval", scored_copy, "--suites=[heldout]", "--dimensions=[mechanics]", "--prompts_per_dimension=1")
        drift = json.loads((run.eval / "report.json").read_text())["suites"]["heldout"]["dimensions"]["mechanics"]
        assert drift["n"] == 1 and abs(drift["drift"]["brightness"]["relative_change"]) > 0


def loss_curve(run_dir):
    return scalars(RunDir(run_dir).tensorboard, "train/loss")


@pytest.mark.slow
def test_killed_midway_and_resumed_the_loss_curve_is_that_of_an_uninterrupted_run(scored_run, tmp_path):
    args = [
        "--batch_size=1",
        "--epochs=100",
        "--max_steps=80",
        "--save_every=20",
        "--sample_every=20",
        "--shuffle_buffer=4",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for run_dir in (whole, killed):
        shutil.copytree(scored_run, run_dir)
    run_stage("stage4", whole, *args)
    train_and_kill(killed, args, RunDir(killed).checkpoints / "latest", 40)  # past an epoch: a new shard order
    run_stage("stage4", killed, *args)
    assert loss_curve(killed) == loss_curve(whole)
    assert [s for s, _ in loss_curve(killed)] == list(range(1, 81))


@pytest.mark.slow
def test_a_lora_run_is_fixed_by_its_seed(scored_run, tmp_path):
    from safetensors.torch import load_file

    def lora_weights(name, seed):
        shutil.copytree(scored_run, tmp_path / name)
        run_stage("stage4", tmp_path / name, "--mode=lora", "--max_steps=2", f"--seed={seed}")
        return load_file(RunDir(tmp_path / name).export / "pytorch_lora_weights.safetensors")

    first, again, other = lora_weights("first", 0), lora_weights("again", 0), lora_weights("other", 1)
    assert first.keys() == again.keys() == other.keys() and first
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.slow
def test_non_finite_inputs_get_no_weight_and_a_diverging_run_stops_with_a_message(scored_copy):
    import io
    import tarfile

    import numpy as np

    from gigavideo.rundir.shards import shard_paths

    run = RunDir(scored_copy)
    shard = shard_paths(run, "stage2")[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name.split(".")[0] for m, _ in members if m.name.startswith("syn-"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{victim}.latents.npy":
                array = np.load(io.BytesIO(data))
                array[0, 0, 0, 0] = np.nan
                buf = io.BytesIO()
                np.save(buf, array)
                data = buf.getvalue()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    proc = run_stage("stage4", scored_copy, "--max_steps=8", "--sample_every=0")
    assert f"non-finite latents or embeddings in ['{victim}']" in proc.stderr
    assert read_manifest(run, "stage4")["non_finite_samples"] >= 1
    proc = run_stage(
        "stage4",
        scored_copy,
        "--overwrite",
        "--epochs=100",
        "--max_steps=40",
        "--lr=1e12",
        "--sample_every=0",
        check=False,
    )
    assert proc.returncode == 2 and "5 micro-batches in a row had a non-finite loss" in proc.stderr
    assert "the micro-batch is skipped" in proc.stderr


def test_validation_videos_come_from_the_stage2_sampler_with_each_prompts_own_seed(scored_run, tmp_path):
    """At step 0 (the base transformer) a validation video is what stage 2's Renderer renders for that prompt and
    seed at guidance 1 with --sample_steps; rank 0 logs it as a GIF with the drift monitors."""
    from diffusers import WanPipeline
    from torch.utils.tensorboard import SummaryWriter

    from gigavideo.models.base import base_model_path
    from gigavideo.models.rendering import Renderer
    from gigavideo.train.validation import Validation

    cfg, run = load_config("tiny", "train", {"sample_count": 2, "sample_steps": 3}), RunDir(scored_run)
    base, family = base_model_path(cfg, run), family_for(cfg.model)
    validation = Validation(run, base, family, "transformer", cfg, torch.device("cpu"), rank=0)
    pipe = WanPipeline.from_pretrained(base)
    settings = {**cfg.render, "guidance_scale": 1.0, "steps": 3}
    stage2 = Renderer(pipe, family, settings, cfg.model.max_sequence_length, "cpu", cfg.model.flow_shift)
    assert len(validation.samples) == 2
    for sample, latents in zip(validation.samples, validation.latents(pipe.transformer), strict=True):
        meta = sample["json"]
        expected = stage2.render([sample["__key__"]], [meta["prompt"]], [meta["seed"]])[0]["latents"]
        assert torch.allclose(latents[0], torch.from_numpy(expected), atol=1e-5)
    writer = SummaryWriter(str(tmp_path))
    validation.run(pipe.transformer, writer, step=6)
    writer.close()  # the writer queues events on a thread: read them only once it has flushed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert len(events.Tags()["images"]) == 2 and all(t.startswith("samples/syn-") for t in events.Tags()["images"])
    assert {"drift/brightness", "drift/motion"} <= set(events.Tags()["scalars"])


def test_the_one_training_step_updates_only_an_accepted_batch_and_follows_the_plain_engines_schedule():
    from gigavideo.train.step import PlainEngine, flow_matching_step

    model = tiny_transformer().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), clip=1.0, lr_factor=lambda s: 0.5**s)
    gen = torch.Generator().manual_seed(0)
    z0, embeds = torch.randn(2, 16, 3, 8, 8, generator=gen), torch.randn(2, 10, 32, generator=gen)
    batch = (z0, embeds, torch.ones(2), torch.tensor([0.3, 0.7]), torch.randn(z0.shape, generator=gen))
    assert flow_matching_step(engine, *batch, accept=lambda per_sample: False) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and engine.global_steps == 0
    for step in range(2):
        loss, per_sample = flow_matching_step(
            engine, *batch, accept=lambda per_sample: bool(per_sample.isfinite().all())
        )
        assert engine.optimizer.param_groups[0]["lr"] == 1e-3 * 0.5**step and per_sample.shape == (2,)
    assert engine.global_steps == 2 and all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_anchor_term_is_zero_at_the_anchor_counts_only_generated_samples_and_pulls_toward_it():
    from gigavideo.train.loss import Anchor

    model = tiny_transformer().train()
    anchor = Anchor(tiny_transformer(), weight=2.0)  # the same random init (the preset's tiny seed)
    gen = torch.Generator().manual_seed(0)
    z0, noise, embeds = (torch.randn(*shape, generator=gen) for shape in ((2, 16, 3, 8, 8),) * 2 + ((2, 10, 32),))
    t, weights, generated = torch.tensor([0.3, 0.7]), torch.zeros(2), torch.tensor([True, False])
    loss, _ = batch_loss(model, z0, embeds, weights, t, noise, anchor=anchor, generated=generated)
    assert loss.item() == 0 and anchor.distances.tolist() == [0.0, 0.0]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    loss, _ = batch_loss(model, z0, embeds, weights, t, noise, anchor=anchor, generated=generated)
    first, second = anchor.distances.tolist()
    assert first > 0 and second == 0 and loss.item() == pytest.approx(2.0 * first / 2)  # weight x batch mean
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    again, _ = batch_loss(model, z0, embeds, weights, t, noise, anchor=anchor, generated=generated)
    assert again.item() < loss.item()  # weights at zero: the step follows the anchor term alone


def test_stage4_with_an_anchor_trains_logs_the_distance_records_it_and_the_plan_counts_the_model(scored_copy):
    from gigavideo.memory import TrainSetting, plan_training

    run_stage("stage4", scored_copy, "--anchor_weight=0.5", "--max_steps=4", "--sample_every=0")
    manifest = read_manifest(RunDir(scored_copy), "stage4")
    assert manifest["config"]["anchor_weight"] == 0.5 and manifest["config"]["anchor_path"] == ""
    distances = scalars(RunDir(scored_copy).tensorboard, "train/anchor_distance")
    # it starts at the anchor, the base (the same weights, to the last bits of two models' float sums)
    assert distances[0][0] == 1 and distances[0][1] < 1e-9 and max(d for _, d in distances) > 1e-6
    missing = run_stage(
        "stage4", scored_copy, "--overwrite", "--anchor_weight=1", "--anchor_path=/nowhere", check=False
    )
    assert missing.returncode == 2 and "--anchor_path: no transformer at /nowhere/transformer" in missing.stderr
    assert read_manifest(RunDir(scored_copy), "stage4") == manifest  # refused before --overwrite removed anything
    setting = TrainSetting(2, False, True, "full", 1, False)
    for weight in (0.0, 1.0):
        plan = plan_training(load_config("wan2.1-t2v-1.3b", "train", {"anchor_weight": weight}), setting, 1, 8)
        assert ("anchor_model" in plan["bytes"]) == (weight > 0)


def test_weight_groups_dimension_maps_each_dimensions_rewards_on_their_own(scored_run):
    """weight_groups = dimension: every dimension's mean weight is 1 under `normalized`, however high its rewards;
    with `all`, a dimension the model does better on weighs more."""
    from gigavideo.rundir.shards import index_json
    from gigavideo.train.data import training_weights

    run, train_cfg = RunDir(scored_run), dict(load_config("tiny", "train").train)
    renders = {k: m["dimension"] for k, m in index_json(run, "stage2").items() if m["source"] == "synthetic"}
    means = {}
    for groups in ("all", "dimension"):
        asked = train_cfg | {"weight_mapping": "normalized", "weight_groups": groups}
        weights, stats, _ = training_weights(run, asked)
        by_dimension = {}
        for key, dim in renders.items():
            if key in weights:
                by_dimension.setdefault(dim, []).append(weights[key])
        means[groups] = {d: sum(w) / len(w) for d, w in by_dimension.items()}
        assert stats["mean_weight_per_group"].keys() == ({"all"} if groups == "all" else set(by_dimension))
    # 1 for each dimension with any reward (0 for one whose rewards are all 0: the tiny camera_motion scorer's)
    scored_dimensions = [d for d, m in means["dimension"].items() if m != 0]
    assert len(scored_dimensions) >= 2
    assert [means["dimension"][d] for d in scored_dimensions] == pytest.approx([1.0] * len(scored_dimensions))
    assert max(means["all"].values()) - min(means["all"].values()) > 0.01  # the dimensions' rewards differ


def test_a_lora_export_loads_in_diffusers_from_its_own_file_and_from_the_comfyui_layout_alike(tmp_path):
    """Rank 4 at alpha 8 (a scale of 2): both files, loaded by stock diffusers' load_lora_weights (which converts
    the original Wan layout), give the trained model's output; adapters outside that layout leave the file out."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from safetensors import safe_open

    from gigavideo.models.export import COMFYUI_LORA_FILE, LORA_FILE, save_component

    family = family_for(load_config("tiny", "train").model)
    family.build_tiny_pipeline().save_pretrained(tmp_path / "base")
    trained = WanPipeline.from_pretrained(tmp_path / "base").transformer
    targets = [*family.lora_targets, "ffn.net.0.proj", "ffn.net.2"]
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    save_component(trained, "lora", tmp_path / "trained", {})
    with safe_open(tmp_path / "trained" / COMFYUI_LORA_FILE, "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q.alpha").item() == 8.0
    assert (
        "diffusion_model.blocks.1.cross_attn.o.lora_B.weight" in keys and "diffusion_model.blocks.0.ffn.2.alpha" in keys
    )
    assert not any(".default" in k or not k.startswith("diffusion_model.blocks.") for k in keys)

    inputs = {
        "hidden_states": torch.randn(1, 16, 3, 8, 8, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 10, 32, generator=gen),
        "return_dict": False,
    }
    with torch.no_grad():
        expected = trained.eval()(**inputs)[0]
        for weight_name in (LORA_FILE, COMFYUI_LORA_FILE):
            pipe = WanPipeline.from_pretrained(tmp_path / "base")
            pipe.load_lora_weights(tmp_path / "trained", weight_name=weight_name)
            torch.testing.assert_close(pipe.transformer.eval()(**inputs)[0], expected, msg=weight_name)

    outside = WanPipeline.from_pretrained(tmp_path / "base").transformer
    outside.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "proj_out"]))
    save_component(outside, "lora", tmp_path / "outside", {})
    assert (tmp_path / "outside" / LORA_FILE).is_file() and not (tmp_path / "outside" / COMFYUI_LORA_FILE).exists()
