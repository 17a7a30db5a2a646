#!/usr/bin/env python
"""Stage 4: reward-weighted flow-matching fine-tuning with DeepSpeed ZeRO.

    loss = mean_i w_i * || v_theta(z_t, p, t) - (eps - z_0) ||^2,   z_t = (1 - t) z_0 + t eps

w_i is the stage-3 reward of a synthetic sample mapped to a weight (--weight_mapping), or the
realism weight for a real video paired with its real caption (--realism_weight, 0 disables it).
Full fine-tuning or LoRA (--mode) of each transformer of the model family: Wan2.2-A14B's two experts
one after the other (--expert=high|low|both), each on its own side of the boundary, with its own
optimizer state, checkpoints (RUN_DIR/stage4/checkpoints/high, .../low) and TensorBoard run.
Launch with torchrun (or slurm/stage4.sh). Checkpoints go to RUN_DIR/stage4/checkpoints and a rerun
resumes exactly (model, optimizer, scheduler, each rank's data position; noise and timesteps are a
function of the step). SIGTERM (preemption, scancel, node drain), SIGUSR1, or the file
RUN_DIR/stage4/stop-request (what slurm/stage4.sh creates on SLURM's warning before preemption) makes
every rank save a checkpoint at the end of its step and exit with code 3, leaving the stop file for
slurm/stage4.sh to requeue the job. A sample whose arrays cannot be decoded (pickled, truncated, missing,
or not the dtype and shape stage 2's manifest says) is left out of its batch, named and counted; one with
non-finite latents or embeddings gets weight 0 and is counted (too many of both stop the run); a
micro-batch whose loss is not finite on any rank is skipped on every rank and counted, and
--max_bad_steps in a row stop the run with a message. TensorBoard goes to RUN_DIR/stage4/tensorboard,
with validation videos and drift monitors every --sample_every steps; each trained transformer to
RUN_DIR/stage4/trained, and the model to RUN_DIR/stage4/export in diffusers format.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed
import torch.distributed as dist
from tqdm import tqdm

from gigavideo.cli import pick_device, run_cli, start_stage
from gigavideo.config import load_config
from gigavideo.distributed import single_process_defaults
from gigavideo.errors import ConfigError, StageFailed
from gigavideo.memory import PeakMemory, check_training_memory, training_memory_record
from gigavideo.models import attention
from gigavideo.models.base import base_model_path
from gigavideo.models.export import SUMMARY_FILE, assemble_export, save_trained
from gigavideo.models.families import family_for
from gigavideo.models.families.wan21 import Expert
from gigavideo.rundir.completion import PROCESS_STARTED, write_manifest
from gigavideo.rundir.layout import read_manifest
from gigavideo.seeding import derive_seed
from gigavideo.train import checkpoint
from gigavideo.train.data import DataPosition, training_loader, training_weights
from gigavideo.train.ds_config import build_ds_config
from gigavideo.train.loop import BadSamples, StepMetrics, StopRequest, compute_dtype, prepare_for_training
from gigavideo.train.loss import batch_loss, sample_timesteps

log = logging.getLogger("gigavideo.stage4")
PREEMPTED_EXIT_CODE = 3
STOP_FILE = "stop-request"  # created by slurm/stage4.sh on SLURM's preemption warning


def gather(state) -> list:
    """Every rank's `state`, in rank order (a collective: every rank calls it)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def build_model(cfg, base: Path, family, expert: Expert):
    from diffusers import WanTransformer3DModel

    tc = cfg.train
    # LoRA in bf16 trains the adapters only (DeepSpeed keeps their fp32 master copy): the frozen base loads in
    # bf16, the precision DeepSpeed would cast it to, and a 14B model needs 28 GB of host memory, not 56.
    frozen_bf16 = tc.mode == "lora" and tc.precision == "bf16"
    dtype = torch.bfloat16 if frozen_bf16 else torch.float32
    transformer = WanTransformer3DModel.from_pretrained(base / expert.component, dtype=dtype)
    attention.use([transformer], cfg.model.attention_backend, pick_device(cfg.model.device), compute_dtype(tc))
    return prepare_for_training(transformer, tc, family, expert)


def build_engine(cfg, base: Path, family, expert: Expert, ds_config: dict):
    """The DeepSpeed engine around one expert's transformer, with AdamW and a linear warm-up."""
    tc = cfg.train
    transformer = build_model(cfg, base, family, expert)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    # A torch AdamW needs no compiled ops; a config with its own "optimizer" (e.g. CPU offload) gets DeepSpeed's.
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    warmup = max(1, int(tc.warmup_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=transformer,
        optimizer=optimizer,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)),
    )
    return engine, scheduler


def check_latents(run, base: Path) -> None:
    """The stage-2 latents must live in the base VAE's latent space (same channels and statistics)."""
    stored = read_manifest(run, "stage2").get("latents")
    vae = json.loads((base / "vae" / "config.json").read_text())
    if stored and (stored["latents_mean"], stored["latents_std"]) != (vae["latents_mean"], vae["latents_std"]):
        raise ConfigError(
            f"{run.stage('stage2')} holds latents of a {stored['channels']}-channel VAE with other statistics than "
            f"the base model's VAE ({base / 'vae'}, {len(vae['latents_mean'])} channels): stage 2 was rendered "
            "with another model. Render again with this preset (stage 2 --overwrite) or train with that model's."
        )


def check_scored(stage3: dict, run) -> None:
    """Rewards are the method: a stage 3 that scored nothing (its judge server was down, say) trains nothing."""
    failed = stage3.get("samples_failed", len(stage3.get("failures", [])))
    if stage3["num_samples"] - failed <= 0:
        raise StageFailed(
            f"{run.manifest('stage3')}: stage 3 scored none of its {stage3['num_samples']} samples, so there is no "
            "reward to train on; fix the judge and run stage 3 again (--overwrite)"
        )


def preflight(cfg, run):
    """Inputs and an inconsistent DeepSpeed config fail here, before any compute (or any --overwrite)."""
    check_scored(read_manifest(run, "stage3"), run)
    if cfg.train.mode not in ("full", "lora"):
        raise ConfigError(f"--mode={cfg.train.mode!r} not in (full, lora)")
    family = family_for(cfg.model)
    experts = family.select_experts(cfg.train.expert)
    base = base_model_path(cfg, run)
    check_latents(run, base)
    attention.resolve(cfg.model.attention_backend, pick_device(cfg.model.device), compute_dtype(cfg.train))
    ds_config = build_ds_config(cfg.train, dist.get_world_size())
    check_training_memory(cfg, ds_config, dist.get_world_size(), log)
    return base, family, experts, ds_config


def train_step(engine, data: DataPosition, cfg, family, expert: Expert, step: int, rank: int, device, bad):
    """One optimizer step over --grad_accum micro-batches; returns their metrics (not yet reduced)."""
    tc = cfg.train
    metrics = StepMetrics(tc.grad_accum, dist.get_world_size())
    for micro in range(tc.grad_accum):
        while True:  # until a micro-batch whose loss is finite on every rank
            batch = data.next()
            log.debug("step %d, micro-batch %d: %s", step + 1, micro, batch["keys"])
            bad.inputs(batch, step + 1)
            # Noise and timesteps depend only on (seed, expert, step, rank, micro step, retry): a resume replays them.
            retry = bad.losses_in_a_row
            gen = torch.Generator().manual_seed(derive_seed(tc.seed, *expert.seed_parts, step, rank, micro, retry))
            z0 = batch["latents"]
            t = sample_timesteps(
                len(z0), tc.timestep_sampling, cfg.model.flow_shift, gen, tc.logit_mean, tc.logit_std, expert.t_range
            )
            noise = torch.randn(z0.shape, generator=gen)
            weights = batch["weights"].to(device)
            timestep = family.transformer_timestep(t, z0)
            loss, per_sample = batch_loss(
                engine, z0, batch["prompt_embeds"], weights, t, noise, compute_dtype(tc), timestep=timestep
            )
            if bad.loss_is_finite_on_every_rank(per_sample, batch["keys"], step + 1):
                break
            del loss, per_sample
        engine.backward(loss)
        metrics.add(loss, per_sample, batch, t)
        engine.step()
    return metrics


def checkpoint_shape(tc) -> dict:
    """What a resumed run must share with its checkpoint (the data-parallel size it need not)."""
    return {
        "mode": tc.mode,
        **({"lora_rank": tc.lora_rank, "lora_targets": tc.lora_targets} if tc.mode == "lora" else {}),
    }


def resume(engine, checkpoints: Path, tag, lora: bool, rank: int, world: int) -> tuple[int, dict, dict, float | None]:
    """(step, this rank's data position, the undecodable samples it met, the step's loss) from checkpoint `tag`,
    or a fresh start."""
    state = checkpoint.resume(engine, checkpoints, tag, trainable_only=lora) or {"step": 0}
    positions = state.get("data_positions")
    if positions and len(positions) != world:
        log.warning(
            "resuming with %d ranks from a checkpoint of %d: each rank restarts its epoch", world, len(positions)
        )
        positions = None
    undecodable = state.get("undecodable") if positions else None
    return (
        state["step"],
        positions[rank] if positions else {"epoch": 0, "batches": 0},
        undecodable[rank] if undecodable else {},
        state.get("loss"),
    )


def train_expert(
    cfg, run, family, expert: Expert, base: Path, ds_config: dict, weights: dict, unreadable: list, stop
) -> dict | None:
    """Train one transformer (every family has at least one) to --max_steps from its latest checkpoint, and
    save it in RUN_DIR/stage4/trained; returns its summary, or None when a stop request ended it early.
    unreadable: the samples training_weights already left out (a member missing, the json unreadable)."""
    tc, lora = cfg.train, cfg.train.mode == "lora"
    rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device(cfg.model.device)
    checkpoints, tensorboard = run.checkpoints / expert.name, run.tensorboard / expert.name
    if expert.name:
        log.info("training the %s-noise expert (%s) on t in [%g, %g)", expert.name, expert.component, *expert.t_range)
    peak = PeakMemory(device)
    tag = checkpoint.prepare_resume(checkpoints, world, checkpoint_shape(tc))
    if tag and tag.endswith(checkpoint.UNIVERSAL):  # written by another number of ranks
        ds_config = ds_config | {"checkpoint": {"load_universal": True}}
    engine, scheduler = build_engine(cfg, base, family, expert, ds_config)
    peak.start()
    step, position, undecodable, loss = resume(engine, checkpoints, tag, lora, rank, world)
    data = DataPosition(
        lambda epoch: training_loader(run, tc, weights, cfg.model.max_sequence_length, world, epoch),
        position["epoch"],
        position["batches"],
    )
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard), purge_step=step + 1 if step else None)
    validation = None
    if tc.sample_every > 0:
        from gigavideo.train.validation import Validation

        validation = Validation(run, base, family, expert.component, cfg, device, rank)
    bad = BadSamples(tc.max_bad_samples, tc.max_bad_steps, undecodable)
    if rank == 0:  # every rank found them in the index; one counts them
        bad.left_out(unreadable, step)
    progress = tqdm(total=tc.max_steps, initial=step, desc=f"train {expert.label}", unit="step", disable=rank != 0)
    stopped, last, totals = False, time.time(), {"loss": loss}
    while step < tc.max_steps:
        metrics = train_step(engine, data, cfg, family, expert, step, rank, device, bad)
        step += 1
        progress.update(1)
        bad.check_samples(run.path)
        totals = metrics.reduce()
        elapsed, last = time.time() - last, time.time()
        if writer and step % tc.log_every == 0:
            grad_norm = engine.get_global_grad_norm()
            scalars = {
                "train/grad_norm": grad_norm,
                "train/lr": scheduler.get_last_lr()[0],
                "train/epoch": data.epoch,
                "train/non_finite_samples": bad.totals["non_finite_samples"],
                "train/undecodable_samples": bad.totals["undecodable_samples"],
                "train/non_finite_losses": bad.losses,
            }
            StepMetrics.write(writer, step, totals, elapsed, scalars)
            progress.set_postfix(loss=f"{totals['loss']:.4f}")
        if validation is not None and step % tc.sample_every == 0:
            validation.run(engine.module, writer, step)
        stop_now = stop.any_rank()
        if step % tc.save_every == 0 or step == tc.max_steps or stop_now:
            client_state = {
                "config": dict(tc),
                "data_positions": gather(data.state()),
                "undecodable": gather(bad.state()),
                "loss": totals["loss"],
            }
            checkpoint.save(
                engine, checkpoints, step, client_state, tc.keep_last, trainable_only=lora, shape=checkpoint_shape(tc)
            )
        if stop_now and step < tc.max_steps:
            stopped = True
            break
    progress.close()
    if writer:
        writer.close()
    if stopped:
        return None
    undecodable_records = sorted({k: r for part in gather(bad.state()) for k, r in part.items()}.values(), key=str)
    summary = {
        "steps": step,
        "final_loss": totals["loss"],
        "non_finite_samples": bad.totals["non_finite_samples"],
        "undecodable_samples": len(undecodable_records),
        "undecodable": undecodable_records,
        "non_finite_losses": bad.losses,
        "t_range": list(expert.t_range),
        "attention_backend": attention.registered(engine.module),
        "memory": training_memory_record(cfg, ds_config, world, peak),
    }
    measured = summary["memory"]["measured_peak"]
    if measured and rank == 0:
        log.info(
            "peak memory of training %s: %.2f GiB measured (%s), %.2f GiB planned (without the fixed reserve)",
            expert.label,
            measured["bytes"] / 2**30,
            measured["measured_by"],
            summary["memory"]["planned_total"] / 2**30,
        )
    save_trained(engine, tc.mode, run.stage("stage4") / "trained" / expert.component, summary)
    del engine, validation
    gc.collect()
    return summary


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Fine-tune on RUN_DIR/stage2 renders weighted by RUN_DIR/stage3 rewards; a rerun resumes.

    e.g. --lr=1e-6 --mode=lora (Wan2.2-A14B: --expert=high|low|both)
    """
    single_process_defaults()
    # Read before any collective: a rank whose peer died fails after this, instead of waiting for ever.
    timeout = timedelta(seconds=int(load_config(config, "train", overrides).train.collective_timeout_s))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    started = start_stage("stage4", "train", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, (base, family, experts, ds_config) = started
    rank, world = dist.get_rank(), dist.get_world_size()
    stop = StopRequest(run.stage("stage4") / STOP_FILE, rank)
    weights, data_stats, unreadable = training_weights(run, cfg.train)
    if rank == 0:
        log.info("training data: %s", data_stats)

    trained = {}
    for expert in experts:  # one after the other: one expert's model and optimizer state in memory at a time
        target = run.stage("stage4") / "trained" / expert.component
        if (
            not target.is_dir()
            and train_expert(cfg, run, family, expert, base, ds_config, weights, unreadable, stop) is None
        ):
            log.warning("stopped on request; rerun (or the requeued job) resumes from the last checkpoint")
            stop.mark_stopped()
            dist.barrier()
            sys.exit(PREEMPTED_EXIT_CODE)
        trained[expert.component] = target

    if rank == 0:
        exported = assemble_export(trained, cfg.train.mode, base, run.export, cfg.train.merge_lora)
        summaries = {e.label: json.loads((trained[e.component] / SUMMARY_FILE).read_text()) for e in experts}
        summary = {
            **summaries[experts[-1].label],
            "experts": summaries,
            "world_size": world,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "mode": cfg.train.mode,
            "family": family.name,
            "export": str(exported),
            "process_seconds": round(world * (time.time() - PROCESS_STARTED), 2),  # the ranks train in step
            "data": data_stats,
            "config": dict(cfg.train),
        }
        write_manifest(run.stage("stage4"), "stage4", summary)
        log.info("stage4 complete: exported %s", exported)
    dist.barrier()


if __name__ == "__main__":
    run_cli(main, "train")
