"""Stage 4 with DeepSpeed on the tiny preset: export, TensorBoard, checkpoints, config checks."""

import json
import subprocess
import sys

import pytest
import torch

from gigavideo.config import REPO_ROOT
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json
from gigavideo.train.ds_config import build_ds_config


@pytest.mark.slow
def test_training_exports_a_pipeline_that_stock_diffusers_loads(trained_run):
    from diffusers import WanPipeline, WanTransformer3DModel

    run = RunDir(trained_run)
    pipe = WanPipeline.from_pretrained(run.export)
    base = WanTransformer3DModel.from_pretrained(run.models / "base" / "transformer")
    changed = [
        n
        for (n, p), (_, q) in zip(pipe.transformer.named_parameters(), base.named_parameters(), strict=False)
        if not torch.equal(p, q)
    ]
    assert len(changed) > 10  # training moved the weights
    video = pipe("a red square", num_frames=5, height=32, width=32, num_inference_steps=2, output_type="np").frames
    assert video.shape == (1, 5, 32, 32, 3)
    manifest = read_manifest(run, "stage4")
    assert manifest["steps"] == 4 and manifest["data"]["scored"] == 9 and manifest["data"]["real"] == 3


@pytest.mark.slow
def test_training_logs_tensorboard_scalars_and_keeps_the_last_checkpoints(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(trained_run)
    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4] and all(e.value > 0 for e in losses)
    assert {
        "train/fm_loss_synthetic",
        "train/fm_loss_real",
        "train/lr",
        "train/grad_norm",
        "weights/mean",
        "weights/effective_sample_fraction",
        "perf/samples_per_second",
    } <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("drift/brightness")] == [2, 4]  # validation videos every 2 steps
    assert len(events.Tags()["images"]) == 2 and all(0 < e.value < 1 for e in events.Scalars("drift/saturation"))
    prompts = {key: meta["prompt"] for key, meta in index_json(run, "stage2").items()}
    for tag in events.Tags()["images"]:  # the images dashboard shows the tag: the sample's key, then its prompt
        key, _, prompt = tag.removeprefix("samples/").partition(": ")
        assert prompts[key].startswith(prompt.removesuffix("...")) and len(prompt) > 20, tag
    tags = sorted(p.name for p in run.checkpoints.glob("step*"))
    assert tags == ["step0000002", "step0000004"]
    assert (run.checkpoints / "latest").read_text().strip() == "step0000004"


@pytest.mark.slow
def test_checkpoints_convert_with_zero_to_fp32(trained_run, tmp_path):
    run = RunDir(trained_run)
    out = tmp_path / "fp32"
    proc = subprocess.run(
        [
            sys.executable,
            str(run.checkpoints / "zero_to_fp32.py"),
            str(run.checkpoints),
            str(out),
            "--safe_serialization",
        ],
        capture_output=True,
        text=True,
        env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    state = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(run.export / "transformer").state_dict()
    assert set(state) == set(exported)
    for name, value in exported.items():
        torch.testing.assert_close(state[name], value)


def test_inconsistent_deepspeed_batch_sizes_fail_before_any_compute(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": 99, "zero_optimization": {"stage": 2}}))
    train = {"ds_config": str(config), "micro_batch_size": 2, "batch_size": 12, "precision": "fp32"}
    with pytest.raises(ValueError, match=r"ds\.json: train_batch_size=99 but the flags give 12"):
        build_ds_config(train, world_size=2)
    filled = build_ds_config(train | {"ds_config": "ds_configs/zero2.json"}, world_size=2)
    assert (
        filled["train_micro_batch_size_per_gpu"],
        filled["gradient_accumulation_steps"],
        filled["train_batch_size"],
        filled["bf16"]["enabled"],
    ) == (2, 3, 12, False)


SAME_UPDATES = """
import os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import deepspeed, torch, torch.distributed as dist
from gigavideo.config import load_config
from gigavideo.distributed import single_process_defaults
from gigavideo.config import REPO_ROOT
from gigavideo.train.ds_config import build_ds_config
from gigavideo.models.families import family_for
from gigavideo.train.loss import batch_loss

single_process_defaults()
deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config("tiny", "train", {"micro_batch_size": 1, "precision": sys.argv[1]})
cfg.train.batch_size = dist.get_world_size()
dtype = torch.bfloat16 if sys.argv[1] == "bf16" else torch.float32
gen = torch.Generator().manual_seed(dist.get_rank())
z0, embeds = torch.randn(1, 16, 3, 8, 8, generator=gen), torch.randn(1, 10, 32, generator=gen)


def train(ds):
    torch.manual_seed(0)
    model = family_for(cfg.model).build_tiny_pipeline().transformer.train()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=ds)
    for _ in range(3):
        loss, _ = batch_loss(engine, z0, embeds, torch.ones(1), torch.tensor([0.5]), torch.ones_like(z0), dtype)
        engine.backward(loss)
        engine.step()
    return engine.zero_optimization_stage(), [p.detach().clone() for p in engine.module.parameters()]


asked = build_ds_config(cfg.train, dist.get_world_size())
as_written = asked | {"zero_optimization": {**asked["zero_optimization"], "stage": 2, "overlap_comm": True,
                                            "contiguous_gradients": True, "reduce_scatter": True}}
(stage, ours), (_, stock) = train(asked), train(as_written)
assert all(torch.equal(a, b) for a, b in zip(ours, stock)), "the updates differ"
# one write per rank: print() writes its arguments separately, and two ranks' words interleave
sys.stdout.write(f"same updates under ZeRO {stage}\\n")
sys.stdout.flush()
dist.barrier()
dist.destroy_process_group()  # no collective left in flight at exit
"""


def test_zero2_drops_per_step_costs_that_buy_nothing_here():
    train = {"ds_config": "ds_configs/zero2.json", "micro_batch_size": 1, "batch_size": 2, "precision": "fp32"}
    one = build_ds_config(train, world_size=1)["zero_optimization"]
    assert (one["stage"], one["overlap_comm"], one["contiguous_gradients"], one["reduce_scatter"]) == (
        1,
        False,
        False,
        False,
    )
    two = build_ds_config(train, world_size=2)["zero_optimization"]
    assert (two["stage"], two["overlap_comm"], two["contiguous_gradients"]) == (2,) + (torch.cuda.is_available(),) * 2
    three = build_ds_config(train | {"ds_config": "ds_configs/zero3.json"}, world_size=2)["zero_optimization"]
    assert (three["stage"], three["overlap_comm"]) == (3, torch.cuda.is_available())  # on CPU: the crash at exit
    offload = build_ds_config(
        train | {"ds_config": "ds_configs/zero3_offload.json", "lr": 1e-5, "weight_decay": 0.0}, world_size=1
    )
    assert (
        offload["zero_optimization"]
        == json.loads((REPO_ROOT / "ds_configs/zero3_offload.json").read_text())["zero_optimization"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_faster_zero_settings_update_the_same_bits_as_the_config_as_written(ranks, precision, tmp_path):
    script = tmp_path / "same_updates.py"
    script.write_text(SAME_UPDATES)
    launcher = (
        [sys.executable]
        if ranks == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    )
    proc = subprocess.run([*launcher, str(script), precision], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"same updates under ZeRO {1 if ranks == 1 else 2}\n") == ranks, proc.stdout
