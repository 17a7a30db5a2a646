#!/usr/bin/env python
"""Stage 4: reward-weighted flow-matching fine-tuning with DeepSpeed ZeRO.

    loss = mean_i w_i * || v_theta(z_t, p, t) - (eps - z_0) ||^2

w_i is the stage-3 reward of a synthetic sample mapped to a weight (--weight_mapping), or the
realism weight for a real video paired with its real caption (--realism_weight, 0 disables it).
Launch with torchrun (or slurm/stage4.sh). Checkpoints go to RUN_DIR/stage4/checkpoints and a
rerun resumes from the newest; TensorBoard to RUN_DIR/stage4/tensorboard; the fine-tuned model
to RUN_DIR/stage4/export as a diffusers pipeline folder.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gigavideo import checkpoint  # noqa: E402
from gigavideo.cli import pick_device, run_cli, start_stage  # noqa: E402
from gigavideo.distributed import single_process_defaults  # noqa: E402
from gigavideo.data import training_loader, training_weights  # noqa: E402
from gigavideo.ds_config import build_ds_config  # noqa: E402
from gigavideo.export import export_pipeline  # noqa: E402
from gigavideo.loss import (noisy_latents_and_target, per_sample_flow_matching_loss, sample_timesteps,  # noqa: E402
                            weighted_loss)
from gigavideo.models import base_model_path  # noqa: E402
from gigavideo.schema import read_manifest, write_manifest  # noqa: E402

log = logging.getLogger("gigavideo.stage4")


def forever(loader):
    """Each rank cycles over its shards, so every rank runs exactly max_steps steps."""
    epoch = 0
    while True:
        count = 0
        for batch in loader:
            count += 1
            yield epoch, batch
        if count == 0:
            raise RuntimeError("this rank's shards gave no full batch; lower --micro_batch_size")
        epoch += 1


def mean_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor.tolist()


def preflight(cfg, run):
    """Inputs and an inconsistent DeepSpeed config fail here, before any compute (or any --overwrite)."""
    read_manifest(run, "stage3")
    return base_model_path(cfg.model, run), build_ds_config(cfg.train, dist.get_world_size())


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Fine-tune on RUN_DIR/stage2 renders weighted by RUN_DIR/stage3 rewards; a rerun resumes (e.g. --lr=1e-6 --weight_mapping=normalized)."""
    single_process_defaults()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    started = start_stage("stage4", "train", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, (base, ds_config) = started
    tc = cfg.train
    rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device(cfg.model.device)
    weights, data_stats = training_weights(run, tc)
    loader = training_loader(run, tc, weights, cfg.model.max_sequence_length, world)
    if rank == 0:
        log.info("training data: %s", data_stats)

    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(base / "transformer", torch_dtype=torch.float32)
    if tc.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    warmup = max(1, int(tc.warmup_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    engine, _, _, _ = deepspeed.initialize(model=transformer, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    state = checkpoint.resume(engine, run.checkpoints) or {"step": 0}
    step = state["step"]
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.tensorboard))
    compute_dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    progress = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=rank != 0)
    data = forever(loader)
    last_log = time.time()
    while step < tc.max_steps:
        sums = {"loss": 0.0, "synthetic": 0.0, "real": 0.0, "n_synthetic": 0.0, "n_real": 0.0, "weight": 0.0}
        for _ in range(tc.grad_accum):
            epoch, batch = next(data)
            # Noise and timesteps depend only on (seed, step, rank, micro step): resume replays them.
            gen = torch.Generator().manual_seed(hash((tc.seed, step, rank, engine.micro_steps)) % (2**63))
            z0 = batch["latents"]
            t = sample_timesteps(len(z0), tc.timestep_sampling, cfg.model.flow_shift, gen, tc.logit_mean, tc.logit_std)
            noise = torch.randn(z0.shape, generator=gen)
            z_t, target = noisy_latents_and_target(z0, noise, t)
            prediction = engine(hidden_states=z_t.to(device, compute_dtype), timestep=(t * 1000).to(device),
                                encoder_hidden_states=batch["prompt_embeds"].to(device, compute_dtype),
                                return_dict=False)[0]
            per_sample = per_sample_flow_matching_loss(prediction, target.to(device))
            if not torch.isfinite(per_sample).all():
                bad = [k for k, v in zip(batch["keys"], per_sample.tolist()) if v != v or abs(v) == float("inf")]
                raise FloatingPointError(f"non-finite loss at step {step} for samples {bad}")
            loss = weighted_loss(per_sample, batch["weights"].to(device))
            engine.backward(loss)
            engine.step()
            real = batch["is_real"].to(device)
            sums["loss"] += loss.item() / tc.grad_accum
            sums["synthetic"] += per_sample[~real].sum().item()
            sums["real"] += per_sample[real].sum().item()
            sums["n_synthetic"] += (~real).sum().item()
            sums["n_real"] += real.sum().item()
            sums["weight"] += batch["weights"][~real.cpu()].sum().item()
        step += 1
        progress.update(1)
        loss, syn, real_loss, n_syn, n_real, w = mean_over_ranks(
            [sums["loss"], sums["synthetic"], sums["real"], sums["n_synthetic"], sums["n_real"], sums["weight"]])
        if writer and step % tc.log_every == 0:
            writer.add_scalar("train/loss", loss, step)
            if n_syn:
                writer.add_scalar("train/fm_loss_synthetic", syn / n_syn, step)
                writer.add_scalar("train/mean_reward_weight", w / n_syn, step)
            if n_real:
                writer.add_scalar("train/fm_loss_real", real_loss / n_real, step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            writer.add_scalar("train/epoch", epoch, step)
            writer.add_scalar("perf/seconds_per_step", time.time() - last_log, step)
            progress.set_postfix(loss=f"{loss:.4f}")
        last_log = time.time()
        if step % tc.save_every == 0 or step == tc.max_steps:
            checkpoint.save(engine, run.checkpoints, step, {"config": dict(tc)}, tc.keep_last)
    progress.close()

    if rank == 0:
        export_pipeline(engine.module, base, run.export)
        writer.close()
        write_manifest(run.stage("stage4"), "stage4", {"steps": step, "final_loss": loss, "world_size": world,
                                                       "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                                                       "export": str(run.export), "data": data_stats,
                                                       "config": dict(tc)})
        log.info("stage4 complete: exported %s", run.export)
    dist.barrier()


if __name__ == "__main__":
    run_cli(main, "train")
