#!/usr/bin/env python
"""Stage 4: reward-weighted flow-matching fine-tuning with DeepSpeed ZeRO.

    loss = mean_i w_i * || v_theta(z_t, p, t) - (eps - z_0) ||^2,   z_t = (1 - t) z_0 + t eps

w_i is the stage-3 reward of a synthetic sample mapped to a weight (--weight_mapping), or the
realism weight for a real video paired with its real caption (--realism_weight, 0 disables it).
Full fine-tuning or LoRA (--mode). Launch with torchrun (or slurm/stage4.sh). Checkpoints go to
RUN_DIR/stage4/checkpoints and a rerun resumes exactly (model, optimizer, scheduler, each rank's
data position; noise and timesteps are a function of the step). SIGUSR1, or the file
RUN_DIR/stage4/stop-request (what slurm/stage4.sh creates on SLURM's warning before preemption),
makes every rank save a checkpoint and exit with code 3. A sample with non-finite
latents or embeddings gets weight 0 and is counted (too many stop the run); a micro-batch whose
loss is not finite on any rank is skipped on every rank and counted, and --max_bad_steps in a row
stop the run with a message. TensorBoard goes to
RUN_DIR/stage4/tensorboard, with validation videos and drift monitors every --sample_every steps;
the model to RUN_DIR/stage4/export in diffusers format.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed
import torch.distributed as dist
from tqdm import tqdm

from gigavideo import checkpoint
from gigavideo.cli import pick_device, run_cli, start_stage
from gigavideo.data import DataPosition, training_loader, training_weights
from gigavideo.distributed import single_process_defaults
from gigavideo.ds_config import build_ds_config
from gigavideo.export import export_model
from gigavideo.loss import batch_loss, sample_timesteps
from gigavideo.models import base_model_path
from gigavideo.schema import read_manifest, write_manifest
from gigavideo.seeding import derive_seed

log = logging.getLogger("gigavideo.stage4")
PREEMPTED_EXIT_CODE = 3
STOP_FILE = "stop-request"  # created by slurm/stage4.sh on SLURM's preemption warning
_stop_requested = False


def _request_stop(signum, _frame):
    global _stop_requested
    _stop_requested = True
    log.warning("received signal %d: saving a checkpoint at the end of this step, then exiting", signum)


def all_ranks(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def sanitize(batch: dict) -> torch.Tensor:
    """Zero the inputs and the weight of samples with non-finite latents or embeddings; True where fine."""
    ok = torch.isfinite(batch["latents"].flatten(1)).all(1) & torch.isfinite(batch["prompt_embeds"].flatten(1)).all(1)
    if not ok.all():
        batch["latents"][~ok] = 0
        batch["prompt_embeds"][~ok] = 0
        batch["weights"][~ok] = 0
    return ok


def gather_positions(position: DataPosition) -> list[dict]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, position.state())
    return out


def build_model(cfg, base: Path):
    from diffusers import WanTransformer3DModel

    tc = cfg.train
    transformer = WanTransformer3DModel.from_pretrained(base / "transformer", torch_dtype=torch.float32)
    if tc.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if tc.mode == "lora":
        from peft import LoraConfig

        transformer.requires_grad_(False)
        torch.manual_seed(int(tc.seed))  # the adapters' random init: the same seed, the same run
        transformer.add_adapter(
            LoraConfig(
                r=int(tc.lora_rank),
                lora_alpha=float(tc.lora_alpha),
                init_lora_weights="gaussian",
                target_modules=list(tc.lora_targets),
            )
        )
    elif tc.mode != "full":
        raise ValueError(f"--mode={tc.mode!r} not in (full, lora)")
    return transformer.train()


def preflight(cfg, run):
    """Inputs and an inconsistent DeepSpeed config fail here, before any compute (or any --overwrite)."""
    read_manifest(run, "stage3")
    if cfg.train.mode not in ("full", "lora"):
        raise ValueError(f"--mode={cfg.train.mode!r} not in (full, lora)")
    return base_model_path(cfg.model, run), build_ds_config(cfg.train, dist.get_world_size())


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Fine-tune on RUN_DIR/stage2 renders weighted by RUN_DIR/stage3 rewards; a rerun resumes.

    e.g. --lr=1e-6 --mode=lora
    """
    single_process_defaults()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    started = start_stage("stage4", "train", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, (base, ds_config) = started
    tc = cfg.train
    rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device(cfg.model.device)
    signal.signal(signal.SIGUSR1, _request_stop)
    stop_file = run.stage("stage4") / STOP_FILE
    if rank == 0:
        stop_file.unlink(missing_ok=True)  # a request from a previous (preempted) run is done
    dist.barrier()
    weights, data_stats = training_weights(run, tc)
    if rank == 0:
        log.info("training data: %s", data_stats)

    transformer = build_model(cfg, base)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    # A torch AdamW needs no compiled ops; a config with its own "optimizer" (e.g. CPU offload) gets DeepSpeed's.
    optimizer = (
        None if "optimizer" in ds_config else torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    )
    warmup = max(1, int(tc.warmup_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=transformer,
        optimizer=optimizer,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)),
    )
    lora = tc.mode == "lora"
    state = checkpoint.resume(engine, run.checkpoints, trainable_only=lora) or {"step": 0}
    step = state["step"]
    positions = state.get("data_positions")
    if positions and len(positions) != world:
        log.warning(
            "resuming with %d ranks from a checkpoint of %d: each rank restarts its epoch", world, len(positions)
        )
        positions = None
    mine = positions[rank] if positions else {"epoch": 0, "batches": 0}
    data = DataPosition(
        lambda epoch: training_loader(run, tc, weights, cfg.model.max_sequence_length, world, epoch),
        mine["epoch"],
        mine["batches"],
    )
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.tensorboard), purge_step=step + 1 if step else None)
    compute_dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    validation = None
    if tc.sample_every > 0:
        from gigavideo.validation import Validation

        validation = Validation(
            run, base, tc.sample_count, tc.sample_steps, cfg.render.fps, cfg.model.max_sequence_length, device, rank
        )
    progress = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=rank != 0)
    skipped = non_finite_losses = bad_in_a_row = 0
    last = time.time()
    stopped = False
    while step < tc.max_steps:
        sums = dict.fromkeys(("loss", "synthetic", "real", "n_synthetic", "n_real", "w_sum", "w_sq", "tokens"), 0.0)
        w_min, w_max = math.inf, -math.inf
        for micro in range(tc.grad_accum):
            while True:
                batch = data.next()
                finite_inputs = sanitize(batch)
                if not finite_inputs.all():
                    bad = [k for k, ok in zip(batch["keys"], finite_inputs.tolist(), strict=False) if not ok]
                    log.warning("step %d: non-finite latents or embeddings in %s; weight set to 0", step + 1, bad)
                    skipped += len(bad)
                # Noise and timesteps depend only on (seed, step, rank, micro step, retry): a resume replays them.
                gen = torch.Generator().manual_seed(derive_seed(tc.seed, step, rank, micro, bad_in_a_row))
                z0 = batch["latents"]
                t = sample_timesteps(
                    len(z0), tc.timestep_sampling, cfg.model.flow_shift, gen, tc.logit_mean, tc.logit_std
                )
                noise = torch.randn(z0.shape, generator=gen)
                loss, per_sample = batch_loss(
                    engine, z0, batch["prompt_embeds"], batch["weights"].to(device), t, noise, compute_dtype
                )
                # Every rank learns whether any rank's loss is not finite before any gradient exists: then all
                # ranks drop this micro-batch (no backward, so nothing non-finite reaches the weights).
                if all_ranks([0.0 if torch.isfinite(per_sample).all() else 1.0])[0] == 0:
                    bad_in_a_row = 0
                    break
                bad_in_a_row += 1
                non_finite_losses += 1
                log.warning(
                    "step %d: non-finite loss (this rank's samples: %s); the micro-batch is skipped",
                    step + 1,
                    batch["keys"],
                )
                del loss, per_sample
                if bad_in_a_row >= tc.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_a_row} micro-batches in a row had a non-finite loss (step "
                        f"{step + 1}); the model diverged. Resume from the last checkpoint "
                        f"with a lower --lr."
                    )
            engine.backward(loss)
            real = batch["is_real"]
            w = batch["weights"]
            sums["loss"] += loss.item() / tc.grad_accum
            sums["synthetic"] += per_sample[~real.to(device)].sum().item()
            sums["real"] += per_sample[real.to(device)].sum().item()
            sums["n_synthetic"] += (~real).sum().item()
            sums["n_real"] += real.sum().item()
            sums["w_sum"] += w[~real].sum().item()
            sums["w_sq"] += (w[~real] ** 2).sum().item()
            sums["tokens"] += z0[0].numel() / z0.shape[1] / 4 * len(z0)  # latent patches (1x2x2) per sample
            if (~real).any():
                w_min, w_max = min(w_min, w[~real].min().item()), max(w_max, w[~real].max().item())
            engine.step()
        step += 1
        progress.update(1)
        if skipped > tc.max_bad_samples:
            raise FloatingPointError(
                f"{skipped} samples had non-finite latents or embeddings (more than "
                f"--max_bad_samples={tc.max_bad_samples}); rerun stage 2 for them"
            )
        totals = all_ranks(
            [sums[k] for k in ("loss", "synthetic", "real", "n_synthetic", "n_real", "w_sum", "w_sq", "tokens")]
        )
        loss_all, syn, real_loss, n_syn, n_real, w_sum, w_sq, tokens = totals
        w_min, w_max = all_ranks([w_min], dist.ReduceOp.MIN)[0], all_ranks([w_max], dist.ReduceOp.MAX)[0]
        elapsed, last = time.time() - last, time.time()
        if writer and step % tc.log_every == 0:
            writer.add_scalar("train/loss", loss_all / world, step)
            if n_syn:
                writer.add_scalar("train/fm_loss_synthetic", syn / n_syn, step)
                writer.add_scalar("weights/mean", w_sum / n_syn, step)
                writer.add_scalar("weights/min", w_min, step)
                writer.add_scalar("weights/max", w_max, step)
                writer.add_scalar("weights/effective_sample_fraction", w_sum**2 / max(w_sq, 1e-12) / n_syn, step)
            if n_real:
                writer.add_scalar("train/fm_loss_real", real_loss / n_real, step)
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            writer.add_scalar("train/epoch", data.epoch, step)
            writer.add_scalar("train/non_finite_samples", skipped, step)
            writer.add_scalar("train/non_finite_losses", non_finite_losses, step)
            writer.add_scalar("perf/samples_per_second", (n_syn + n_real) / max(elapsed, 1e-9), step)
            writer.add_scalar("perf/tokens_per_second", tokens / max(elapsed, 1e-9), step)
            if torch.cuda.is_available():
                writer.add_scalar("perf/peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30, step)
            progress.set_postfix(loss=f"{loss_all / world:.4f}")
        if validation is not None and step % tc.sample_every == 0:
            validation.run(engine.module, writer, step)
        stop = all_ranks([1.0 if _stop_requested or stop_file.exists() else 0.0])[0] > 0
        if step % tc.save_every == 0 or step == tc.max_steps or stop:
            checkpoint.save(
                engine,
                run.checkpoints,
                step,
                {"config": dict(tc), "data_positions": gather_positions(data)},
                tc.keep_last,
                trainable_only=lora,
            )
        if stop and step < tc.max_steps:
            stopped = True
            break
    progress.close()
    if writer:
        writer.close()
    if stopped:
        log.warning("stopped at step %d on request; rerun (or the requeued job) resumes from there", step)
        dist.barrier()
        sys.exit(PREEMPTED_EXIT_CODE)

    exported = export_model(engine, tc.mode, base, run.export)
    if rank == 0:
        write_manifest(
            run.stage("stage4"),
            "stage4",
            {
                "steps": step,
                "final_loss": loss_all / world,
                "non_finite_samples": skipped,
                "non_finite_losses": non_finite_losses,
                "world_size": world,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "mode": tc.mode,
                "export": str(exported),
                "data": data_stats,
                "config": dict(tc),
            },
        )
        log.info("stage4 complete: exported %s", exported)
    dist.barrier()


if __name__ == "__main__":
    run_cli(main, "train")
