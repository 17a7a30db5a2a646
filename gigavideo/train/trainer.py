"""Stage 4's training: `train_expert` (the loop, top to bottom) calling `train_step` (one optimizer step of
the reward-weighted flow-matching loss), a `Checkpointer` that owns what goes into a checkpoint and comes out of
it, and a `Monitor` for TensorBoard and the progress bar."""

from __future__ import annotations

import gc
import logging
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gigavideo.cli import pick_device
from gigavideo.distributed import import_deepspeed
from gigavideo.memory import PeakMemory, training_memory_record
from gigavideo.models import attention
from gigavideo.models.export import save_trained
from gigavideo.models.families.wan21 import Expert
from gigavideo.models.pipeline import check_architecture
from gigavideo.seeding import derive_seed
from gigavideo.train import checkpoint
from gigavideo.train.data import DataPosition, training_loader
from gigavideo.train.loop import BadSamples, StepMetrics, compute_dtype, prepare_for_training
from gigavideo.train.loss import Anchor, sample_timesteps
from gigavideo.train.step import flow_matching_step

log = logging.getLogger("gigavideo.stage4")


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


def anchor_folder(cfg, base: Path, expert: Expert) -> Path:
    """The anchor's transformer folder for one expert, checked to be the preset's architecture (stage 4's preflight
    calls this before anything is removed)."""
    folder = Path(cfg.train.anchor_path or base) / expert.component
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--anchor_path: no transformer at {folder} (a diffusers folder of the same family)")
    check_architecture(folder, cfg.model.arch_transformer, cfg.preset)
    return folder


def load_anchor(cfg, base: Path, expert: Expert, device) -> Anchor | None:
    """--anchor_weight > 0: the frozen anchor transformer (--anchor_path, else the base), in the compute dtype."""
    from diffusers import WanTransformer3DModel

    tc = cfg.train
    if tc.anchor_weight == 0:
        return None
    folder = anchor_folder(cfg, base, expert)
    model = WanTransformer3DModel.from_pretrained(folder, dtype=compute_dtype(tc)).to(device)
    attention.use([model], cfg.model.attention_backend, device, compute_dtype(tc))
    log.info("anchoring %s to %s (weight %g)", expert.label, folder, tc.anchor_weight)
    return Anchor(model, tc.anchor_weight)


def build_engine(cfg, base: Path, family, expert: Expert, ds_config: dict):
    """The DeepSpeed engine around one expert's transformer, with AdamW and a linear warm-up."""
    tc = cfg.train
    transformer = build_model(cfg, base, family, expert)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    # A torch AdamW needs no compiled ops; a config with its own "optimizer" (e.g. CPU offload) gets DeepSpeed's.
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    warmup = max(1, tc.warmup_steps)
    engine, _, _, scheduler = import_deepspeed().initialize(
        model=transformer,
        optimizer=optimizer,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)),
    )
    return engine, scheduler


def train_step(
    engine, data: DataPosition, cfg, family, expert: Expert, step: int, rank: int, device, bad, grad_accum, anchor=None
):
    """One optimizer step over grad_accum micro-batches; returns their metrics (not yet reduced)."""
    tc = cfg.train
    metrics = StepMetrics(grad_accum, dist.get_world_size())
    for micro in range(grad_accum):
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
            stepped = flow_matching_step(
                engine,
                z0,
                batch["prompt_embeds"],
                weights,
                t,
                noise,
                compute_dtype(tc),
                timestep=timestep,
                accept=partial(bad.loss_is_finite_on_every_rank, keys=batch["keys"], step=step + 1),
                anchor=anchor,
                generated=~batch["is_real"],
            )
            if stepped is not None:
                break
        metrics.add(*stepped, batch, t, anchor.distances if anchor else None)
    return metrics


class Checkpointer:
    """What goes into a stage-4 checkpoint and what comes out of it, in one place: the engine's states (DeepSpeed:
    model, optimizer, scheduler; the trainable ones only for LoRA) and, in its client state, the config, every
    rank's data position, the undecodable samples each rank met and the step's loss. A checkpoint of another
    number of ranks is resumed through DeepSpeed's universal format (gigavideo/train/checkpoint.py)."""

    def __init__(self, folder: Path, train_cfg, world: int):
        self.folder, self.tc, self.world = folder, train_cfg, world
        self.lora = train_cfg.mode == "lora"
        # what a resumed run must share with its checkpoint (the data-parallel size it need not)
        self.shape = {"mode": train_cfg.mode, "batch_size": train_cfg.batch_size}
        if self.lora:
            self.shape |= {"lora_rank": train_cfg.lora_rank, "lora_targets": train_cfg.lora_targets}
        self.tag = checkpoint.prepare_resume(folder, world, self.shape)

    def ds_config(self, ds_config: dict) -> dict:
        if self.tag and self.tag.endswith(checkpoint.UNIVERSAL):  # written by another number of ranks
            return ds_config | {"checkpoint": {"load_universal": True}}
        return ds_config

    def load(self, engine, rank: int) -> tuple[int, dict, dict, float | None]:
        """(step, this rank's data position, the undecodable samples it met, the step's loss), or a fresh start."""
        state = checkpoint.resume(engine, self.folder, self.tag, trainable_only=self.lora) or {"step": 0}
        positions = state.get("data_positions")
        if positions and len(positions) != self.world:
            log.warning(
                "resuming with %d ranks from a checkpoint of %d: each rank restarts its epoch",
                self.world,
                len(positions),
            )
            positions = None
        undecodable = state.get("undecodable") if positions else None
        return (
            state["step"],
            positions[rank] if positions else {"epoch": 0, "batches": 0},
            undecodable[rank] if undecodable else {},
            state.get("loss"),
        )

    def save(self, engine, step: int, data: DataPosition, bad: BadSamples, loss: float) -> None:
        """A collective: every rank's data position and bad samples are gathered into the client state."""
        client_state = {
            "config": dict(self.tc),
            "data_positions": gather(data.state()),
            "undecodable": gather(bad.state()),
            "loss": loss,
        }
        checkpoint.save(
            engine, self.folder, step, client_state, self.tc.keep_last, trainable_only=self.lora, shape=self.shape
        )


class Monitor:
    """TensorBoard scalars every --log_every steps and the progress bar, on rank 0."""

    def __init__(self, folder: Path, tc, steps: int, step: int, rank: int, label: str):
        self.tc, self.writer, self.last = tc, None, time.time()
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder), purge_step=step + 1 if step else None)
        self.progress = tqdm(total=steps, initial=step, desc=f"train {label}", unit="step", disable=rank != 0)

    def step(self, step: int, totals: dict, engine, scheduler, data: DataPosition, bad: BadSamples) -> None:
        self.progress.update(1)
        elapsed, self.last = time.time() - self.last, time.time()
        if self.writer is None or step % self.tc.log_every:
            return
        scalars = {
            "train/grad_norm": engine.get_global_grad_norm(),
            "train/lr": scheduler.get_last_lr()[0],
            "train/epoch": data.epoch,
            "train/non_finite_samples": bad.totals["non_finite_samples"],
            "train/undecodable_samples": bad.totals["undecodable_samples"],
            "train/non_finite_losses": bad.losses,
        }
        if self.tc.anchor_weight > 0 and totals["n_synthetic"]:  # mean ||v_theta - v_anchor||^2 on generated samples
            scalars["train/anchor_distance"] = totals["anchor"] / totals["n_synthetic"]
        StepMetrics.write(self.writer, step, totals, elapsed, scalars)
        self.progress.set_postfix(loss=f"{totals['loss']:.4f}")

    def close(self) -> None:
        self.progress.close()
        if self.writer:
            self.writer.close()


def train_expert(
    cfg, run, family, expert: Expert, base: Path, ds_config: dict, weights: dict, unreadable: list, length, stop
) -> dict | None:
    """Train one transformer (every family has at least one) for length["steps"] from its latest checkpoint, and
    save it in RUN_DIR/stage4/trained; returns its summary, or None when a stop request ended it early.
    unreadable: the samples training_weights already left out (a member missing, the json unreadable);
    length: the batch and the steps (gigavideo/train/batch.py)."""
    tc = cfg.train
    rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device(cfg.model.device)
    if expert.name:
        log.info("training the %s-noise expert (%s) on t in [%g, %g)", expert.name, expert.component, *expert.t_range)
    checkpointer = Checkpointer(run.checkpoints / expert.name, tc, world)
    peak = PeakMemory(device)
    engine, scheduler = build_engine(cfg, base, family, expert, checkpointer.ds_config(ds_config))
    peak.start()
    step, position, undecodable, loss = checkpointer.load(engine, rank)
    data = DataPosition(
        lambda epoch: training_loader(run, tc, weights, cfg.model.max_sequence_length, world, epoch),
        position["epoch"],
        position["batches"],
    )
    bad = BadSamples(tc.max_bad_samples, tc.max_bad_steps, undecodable)
    if rank == 0:  # every rank found them in the index; one counts them
        bad.left_out(unreadable, step)
    steps = length["steps"]
    monitor = Monitor(run.tensorboard / expert.name, tc, steps, step, rank, expert.label)
    anchor = load_anchor(cfg, base, expert, device)
    validation = None
    if tc.sample_every > 0:
        from gigavideo.train.validation import Validation

        validation = Validation(run, base, family, expert.component, cfg, device, rank)
    totals = {"loss": loss}
    while step < steps:
        totals = train_step(engine, data, cfg, family, expert, step, rank, device, bad, length["grad_accum"], anchor)
        totals = totals.reduce()
        step += 1
        bad.check_samples(run.path)
        monitor.step(step, totals, engine, scheduler, data, bad)
        if validation is not None and step % tc.sample_every == 0:
            validation.run(engine.module, monitor.writer, step)
        stop_now = stop.any_rank()
        if step % tc.save_every == 0 or step == steps or stop_now:
            checkpointer.save(engine, step, data, bad, totals["loss"])
        if stop_now and step < steps:
            monitor.close()
            return None
    monitor.close()
    summary = expert_summary(cfg, expert, engine, ds_config, length, totals, bad, peak)
    save_trained(engine, tc.mode, run.stage("stage4") / "trained" / expert.component, summary)
    del engine, validation
    gc.collect()
    return summary


def expert_summary(cfg, expert: Expert, engine, ds_config: dict, length: dict, totals: dict, bad, peak) -> dict:
    """What one expert's training did (a collective: every rank's undecodable samples are gathered)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    undecodable = sorted({k: r for part in gather(bad.state()) for k, r in part.items()}.values(), key=str)
    summary = {
        "steps": length["steps"],
        "batch": length,
        "final_loss": totals["loss"],
        "non_finite_samples": bad.totals["non_finite_samples"],
        "undecodable_samples": len(undecodable),
        "undecodable": undecodable,
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
    return summary
