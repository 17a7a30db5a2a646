#!/usr/bin/env python
"""Stage-4 step cost, every number measured in this one run on this one device.

    python bench/train_step.py               # tiny preset on CPU (--device=cuda: the same on a GPU)

The real-size step (MFU, peak memory against the plan) is bench/gpu_check.sh's.

Prints, as medians of interleaved rounds (one thread per process on CPU): (1) the stage-4 step (DeepSpeed
engine, the reward-weighted objective) divided by a bare PyTorch step of the same model on the same batch
(forward, backward, the recipe's gradient clipping, AdamW; with two processes the bare model is wrapped
in DistributedDataParallel), with one process and with two (target <= 1.10 for both);
the step with the reference-model anchor (train.anchor_weight) against the plain stage-4 step;
(2) a step on precomputed latents and embeddings vs encoding the video and the prompt on the fly
(target >= 3x); (3) per-rank optimizer-state memory under ZeRO-0/2/3 with two ranks (the
`--memory_probe` subprocesses, launched with torchrun).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from gigavideo.cli import run_cli
from gigavideo.config import load_config
from gigavideo.distributed import single_process_defaults
from gigavideo.models.families import family_for
from gigavideo.models.pipeline import encode_video
from gigavideo.train.ds_config import build_ds_config
from gigavideo.train.loss import Anchor
from gigavideo.train.step import PlainEngine, flow_matching_step

REPO = Path(__file__).resolve().parent.parent


def interleaved(variants: dict, rounds: int, steps: int, device) -> dict[str, float]:
    """Median seconds per step of each variant, timed in interleaved rounds (the order rotating each round),
    so that a drift in the machine's speed hits every variant alike."""
    for fn in variants.values():
        fn()  # warm-up
    names, times = list(variants), {name: [] for name in variants}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(variants[name], steps, device, warm_up=False))
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn, steps: int, device, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def make_batch(pipe, batch: int, frames: int, size: int, device):
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, frames, size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    latents = torch.stack([encode_video(pipe.vae, p, device) for p in pixels])
    embeds, _ = pipe.encode_prompt(
        ["a red square moves left"] * batch, do_classifier_free_guidance=False, max_sequence_length=128, device=device
    )
    noise = torch.randn(latents.shape, generator=gen).to(device)
    return pixels, latents, embeds, noise


def engine_for(model, train_cfg, world_size=1):
    import deepspeed

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_ds_config(train_cfg, world_size))
    return engine


def memory_probe(zero: int) -> None:
    """One rank of a two-rank run: report this rank's optimizer-state bytes after one step."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(
        "tiny",
        "train",
        {
            "micro_batch_size": 1,
            "grad_accum": 1,
            "ds_config": f"ds_configs/zero{zero}.json" if zero else "ds_configs/zero2.json",
        },
    )
    model = family_for(cfg.model).build_tiny_pipeline().transformer.train()
    ds = build_ds_config(cfg.train, dist.get_world_size())
    ds["zero_optimization"]["stage"] = zero
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    z0 = torch.randn(1, 16, 3, 8, 8)
    flow_matching_step(engine, z0, torch.randn(1, 16, 32), torch.ones(1), torch.tensor([0.5]), torch.randn_like(z0))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
    if dist.get_rank() == 0:
        print(json.dumps({"zero": zero, "optimizer_state_bytes_rank0": state}))


def main(
    device: str = "cpu",
    steps: int = 36,
    batch: int = 2,
    frames: int = 33,
    size: int = 128,
    preset: str = "tiny",
    memory_probe_zero: int = -1,
    rounds: int = 9,
    threads: int = 1,
    ranks_probe: bool = False,
):
    """See the module docstring."""
    if memory_probe_zero >= 0:
        return memory_probe(memory_probe_zero)
    if device == "cpu":
        torch.set_num_threads(threads)  # one thread: the per-step overheads are what is compared
    import deepspeed

    single_process_defaults()  # one process without torchrun; under torchrun (--ranks_probe) its world
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = load_config(
        preset,
        "train",
        {"micro_batch_size": batch, "grad_accum": 1, "precision": "bf16" if dtype == torch.bfloat16 else "fp32"},
    )
    if cfg.model.kind == "wan":
        raise SystemExit("the real-size step is bench/gpu_check.sh's (random weights of the published architecture)")
    pipe = family_for(cfg.model).build_tiny_pipeline().to(dev)
    pixels, latents, embeds, noise = make_batch(pipe, batch, frames, size, dev)
    t, weights = torch.full((batch,), 0.5), torch.ones(batch, device=dev)
    bare_step, stage4_step, engine = step_functions(cfg, pipe, latents, embeds, weights, t, noise, dev)
    anchor = Anchor(pipe.transformer.__class__.from_config(pipe.transformer.config).to(dev), weight=1.0)
    generated = torch.ones(batch, dtype=torch.bool)

    def anchored_step():  # --anchor_weight > 0: one more forward, of the frozen anchor, without backward
        flow_matching_step(engine, latents, embeds, weights, t, noise, anchor=anchor, generated=generated)

    variants = {"bare": bare_step, "stage4": stage4_step, "anchored": anchored_step}
    medians = interleaved(variants, rounds, max(1, steps // rounds), dev)
    if ranks_probe:
        return report_ranks(medians | {"zero": engine.zero_optimization_stage()})

    def on_the_fly_step():
        with torch.no_grad():
            z0 = torch.stack([encode_video(pipe.vae, p, dev) for p in pixels])
            e, _ = pipe.encode_prompt(
                ["a red square moves left"] * batch,
                do_classifier_free_guidance=False,
                max_sequence_length=128,
                device=dev,
            )
        flow_matching_step(engine, z0, e, weights, t, noise)

    bare, stage4 = medians["bare"], medians["stage4"]
    fly = timed(on_the_fly_step, 2, dev)  # tens of times slower: a couple of steps tell
    print(
        f"device {device} ({torch.get_num_threads()} threads), tiny preset, batch {batch} of {frames}x{size}x{size} "
        f"videos; medians of {rounds} interleaved rounds of {max(1, steps // rounds)} steps"
    )
    zero = engine.zero_optimization_stage()
    print(f"1 process, bare step:        {bare * 1000:8.1f} ms/step   (forward, backward, clipping, AdamW)")
    print(
        f"1 process, stage-4 step:     {stage4 * 1000:8.1f} ms/step   ratio {stage4 / bare:.2f} (target <= 1.10; "
        f"ZeRO-{zero})"
    )
    anchored = medians["anchored"]
    print(
        f"1 process, with the anchor:  {anchored * 1000:8.1f} ms/step   ratio {anchored / stage4:.2f} to the stage-4 "
        "step (train.anchor_weight > 0)"
    )
    two = torchrun_json(
        [
            "--ranks_probe=True",
            f"--rounds={rounds}",
            f"--steps={steps}",
            f"--frames={frames}",
            f"--size={size}",
            f"--batch={batch}",
            f"--threads={threads}",
        ]
    )
    if "error" in two:
        print(f"2 processes: failed: {two['error']}")
    else:
        print(f"2 processes, bare step:      {two['bare'] * 1000:8.1f} ms/step   (DistributedDataParallel)")
        print(
            f"2 processes, stage-4 step:   {two['stage4'] * 1000:8.1f} ms/step   "
            f"ratio {two['stage4'] / two['bare']:.2f} (target <= 1.10; ZeRO-{two['zero']})"
        )
    print(
        f"encoding on the fly:         {fly * 1000:8.1f} ms/step   precomputed is {fly / stage4:.1f}x faster "
        f"(target >= 3x)"
    )
    for zero in (0, 2, 3):
        result = torchrun_json([f"--memory_probe_zero={zero}"])
        print(
            f"ZeRO-{zero}, 2 ranks: optimizer state on rank 0: "
            f"{result.get('optimizer_state_bytes_rank0', 0) / 2**20:.3f} MiB {result.get('error', '')}"
        )


def step_functions(cfg, pipe, latents, embeds, weights, t, noise, dev):
    """(bare step, stage-4 step, engine) on the same tiny weights and batch: the one training step
    (gigavideo/train/step.py) through DeepSpeed's engine, and through a PlainEngine (forward, backward, the
    recipe's gradient clipping, AdamW; DDP with more than one process)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    bare_model = pipe.transformer.__class__.from_config(pipe.transformer.config).to(dev).train()
    bare_model.load_state_dict(pipe.transformer.state_dict())
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-5)
    if world > 1:
        bare_model = torch.nn.parallel.DistributedDataParallel(bare_model)
    clip = float(build_ds_config(cfg.train, world).get("gradient_clipping", 0.0))
    bare = PlainEngine(bare_model, bare_opt, clip)
    model = pipe.transformer.__class__.from_config(pipe.transformer.config).to(dev).train()
    model.load_state_dict(pipe.transformer.state_dict())
    engine = engine_for(model, cfg.train, world)

    def bare_step():
        flow_matching_step(bare, latents, embeds, weights, t, noise)

    def stage4_step():
        flow_matching_step(engine, latents, embeds, weights, t, noise)

    return bare_step, stage4_step, engine


def report_ranks(medians: dict) -> None:
    """Rank 0 of the two-process run prints its medians as one JSON line; the slowest rank sets the pace."""
    import torch.distributed as dist

    slowest = [None] * dist.get_world_size()
    dist.all_gather_object(slowest, medians)
    if dist.get_rank() == 0:
        print(json.dumps({name: max(m[name] for m in slowest) for name in medians}), flush=True)


def torchrun_json(flags: list[str]) -> dict:
    """This script on two processes (torchrun); its last JSON line."""
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": out.stderr[-300:]}


if __name__ == "__main__":
    run_cli(main)
