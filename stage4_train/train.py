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

import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gigavideo.cli import pick_device, run_cli, start_stage
from gigavideo.config import load_config
from gigavideo.distributed import import_deepspeed, single_process_defaults
from gigavideo.errors import ConfigError
from gigavideo.launch import STOPPED_ON_REQUEST
from gigavideo.memory import check_training_memory
from gigavideo.models import attention
from gigavideo.models.base import base_model_path
from gigavideo.models.export import SUMMARY_FILE, assemble_export
from gigavideo.models.families import family_for
from gigavideo.rundir.completion import finish_rank
from gigavideo.rundir.layout import read_manifest
from gigavideo.train.batch import describe as describe_batch
from gigavideo.train.batch import plan_batch
from gigavideo.train.data import check_latents, check_scored, training_weights
from gigavideo.train.ds_config import build_ds_config
from gigavideo.train.loop import StopRequest, compute_dtype
from gigavideo.train.trainer import anchor_folder, train_expert

log = logging.getLogger("gigavideo.stage4")
PREEMPTED_EXIT_CODE = STOPPED_ON_REQUEST  # slurm/stage4.sh requeues; gigavideo.launch reports it in one line
STOP_FILE = "stop-request"  # created by slurm/stage4.sh on SLURM's preemption warning


def preflight(cfg, run):
    """Inputs and an inconsistent DeepSpeed config fail here, before any compute (or any --overwrite)."""
    check_scored(read_manifest(run, "stage3"), run)
    if cfg.train.mode not in ("full", "lora"):
        raise ConfigError(f"--mode={cfg.train.mode!r} not in (full, lora)")
    family = family_for(cfg.model)
    experts = family.select_experts(cfg.train.expert)
    base = base_model_path(cfg, run)
    check_latents(run, base)
    if cfg.train.anchor_weight > 0:
        for expert in experts:
            anchor_folder(cfg, base, expert)
    attention.resolve(cfg.model.attention_backend, pick_device(cfg.model.device), compute_dtype(cfg.train))
    ds_config = build_ds_config(cfg.train, dist.get_world_size())
    check_training_memory(cfg, ds_config, dist.get_world_size(), log)
    return base, family, experts, ds_config


def export_and_summarize(cfg, run, family, experts, base: Path, trained: dict, data_stats: dict) -> dict:
    """The model in diffusers format (RUN_DIR/stage4/export), and the manifest's fields."""
    exported = assemble_export(trained, cfg.train.mode, base, run.export, cfg.train.merge_lora)
    summaries = {e.label: json.loads((trained[e.component] / SUMMARY_FILE).read_text()) for e in experts}
    log.info("stage4 complete: exported %s", exported)
    return {
        **summaries[experts[-1].label],
        "experts": summaries,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "mode": cfg.train.mode,
        "family": family.name,
        "export": str(exported),
        "data": data_stats,
        "config": dict(cfg.train),
    }


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Fine-tune on RUN_DIR/stage2 renders weighted by RUN_DIR/stage3 rewards; a rerun resumes.

    e.g. --lr=1e-6 --mode=lora (Wan2.2-A14B: --expert=high|low|both)
    """
    single_process_defaults()
    # Read before any collective: a rank whose peer died fails after this, instead of waiting for ever.
    timeout = timedelta(seconds=int(load_config(config, "train", overrides).train.collective_timeout_s))
    import_deepspeed().init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    started = start_stage("stage4", "train", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, (base, family, experts, ds_config) = started
    rank, world = dist.get_rank(), dist.get_world_size()
    stop = StopRequest(run.stage("stage4") / STOP_FILE, rank)
    weights, data_stats, unreadable = training_weights(run, cfg.train)
    length = plan_batch(cfg.train, world).length(len(weights), cfg.train.epochs, cfg.train.max_steps)
    if rank == 0:
        log.info("training data: %s", data_stats)
        log.info("stage 4: %s", describe_batch(length))
    trained = {}
    for expert in experts:  # one after the other: one expert's model and optimizer state in memory at a time
        trained[expert.component] = target = run.stage("stage4") / "trained" / expert.component
        if target.is_dir():
            continue  # trained before a stop or a failure of a later expert
        if train_expert(cfg, run, family, expert, base, ds_config, weights, unreadable, length, stop) is None:
            log.warning("stopped on request; rerun (or the requeued job) resumes from the last checkpoint")
            stop.mark_stopped()
            dist.barrier()
            sys.exit(PREEMPTED_EXIT_CODE)

    def finalize(parts: list[dict]) -> dict:  # one rank, once every rank has trained
        return export_and_summarize(cfg, run, family, experts, base, trained, data_stats)

    finish_rank(run.stage("stage4"), "stage4", rank, world, {}, finalize=finalize)
    dist.barrier()


if __name__ == "__main__":
    run_cli(main, "train")
