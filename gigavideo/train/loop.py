"""Stage 4's loop parts: the per-step metrics, the stop request, non-finite input handling.

The loop itself lives in stage4_train/train.py; what is here has state of its own or talks to
every rank, so the loop there reads as the method: sample a batch, weighted loss, backward, step.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from gigavideo.errors import ConfigError
from gigavideo.rundir.fields import SchemaError

log = logging.getLogger("gigavideo.stage4")


def compute_dtype(train_cfg) -> torch.dtype:
    """What the transformer computes in while training: bf16 under --precision=bf16, else fp32."""
    return torch.bfloat16 if train_cfg.precision == "bf16" else torch.float32


def prepare_for_training(transformer, train_cfg, family, expert):
    """Gradient checkpointing and, for --mode=lora, the family's LoRA adapters on a frozen base, as the flags
    ask (stage 4 and bench/gpu_check.py)."""
    tc = train_cfg
    if tc.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if tc.mode == "lora":
        from peft import LoraConfig

        from gigavideo.seeding import derive_seed

        transformer.requires_grad_(False)
        # The adapters' random init: the same seed, the same run (and each expert its own).
        torch.manual_seed(derive_seed(tc.seed, *expert.seed_parts) if expert.seed_parts else tc.seed)
        transformer.add_adapter(
            LoraConfig(
                r=tc.lora_rank,
                lora_alpha=tc.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(tc.lora_targets or family.lora_targets),
            )
        )
    elif tc.mode != "full":
        raise ConfigError(f"--mode={tc.mode!r} not in (full, lora)")
    return transformer.train()


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


class StopRequest:
    """SIGTERM (preemption, scancel, node drain), SIGUSR1, or the stop file (what slurm/stage4.sh creates on
    SLURM's warning before preemption): every rank saves a checkpoint at the end of the step and the run
    exits. The stop file is left behind (`mark_stopped`) so that slurm/stage4.sh knows to requeue."""

    def __init__(self, stop_file: Path, rank: int):
        self.stop_file, self.rank, self.signalled = stop_file, rank, False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)
        if rank == 0:
            stop_file.unlink(missing_ok=True)  # a request from a previous (preempted) run is done
        if dist.is_initialized():
            dist.barrier()

    def _on_signal(self, signum, _frame):
        self.signalled = True
        log.warning("received signal %d: saving a checkpoint at the end of this step, then exiting", signum)

    def any_rank(self) -> bool:
        return all_ranks([1.0 if self.signalled or self.stop_file.exists() else 0.0])[0] > 0

    def mark_stopped(self) -> None:
        if self.rank == 0:
            self.stop_file.touch()


class StepMetrics:
    """One optimizer step's sums over its micro-batches, reduced over ranks and written to TensorBoard."""

    SUMS = ("loss", "synthetic", "real", "n_synthetic", "n_real", "w_sum", "w_sq", "tokens", "anchor")

    def __init__(self, grad_accum: int, world: int):
        self.grad_accum, self.world = grad_accum, world
        self.sums = dict.fromkeys(self.SUMS, 0.0)
        self.w_min, self.w_max = math.inf, -math.inf
        self.t_min, self.t_max = math.inf, -math.inf

    def add(self, loss, per_sample: torch.Tensor, batch: dict, t: torch.Tensor, anchor_distances=None) -> None:
        real, w, z0 = batch["is_real"], batch["weights"], batch["latents"]
        if anchor_distances is not None:  # per sample, 0 for real clips
            self.sums["anchor"] += anchor_distances.sum().item()
        on_device = real.to(per_sample.device)
        self.sums["loss"] += loss.item() / self.grad_accum
        self.sums["synthetic"] += per_sample[~on_device].sum().item()
        self.sums["real"] += per_sample[on_device].sum().item()
        self.sums["n_synthetic"] += (~real).sum().item()
        self.sums["n_real"] += real.sum().item()
        self.sums["w_sum"] += w[~real].sum().item()
        self.sums["w_sq"] += (w[~real] ** 2).sum().item()
        self.sums["tokens"] += z0[0].numel() / z0.shape[1] / 4 * len(z0)  # latent patches (1x2x2) per sample
        if (~real).any():
            self.w_min, self.w_max = min(self.w_min, w[~real].min().item()), max(self.w_max, w[~real].max().item())
        self.t_min, self.t_max = min(self.t_min, t.min().item()), max(self.t_max, t.max().item())

    def reduce(self) -> dict:
        """Every rank takes part; the totals over ranks (loss: the mean over ranks)."""
        totals = dict(zip(self.SUMS, all_ranks([self.sums[k] for k in self.SUMS]), strict=True))
        totals["loss"] /= self.world
        totals["w_min"] = all_ranks([self.w_min], dist.ReduceOp.MIN)[0]
        totals["w_max"] = all_ranks([self.w_max], dist.ReduceOp.MAX)[0]
        totals["t_min"] = all_ranks([self.t_min], dist.ReduceOp.MIN)[0]
        totals["t_max"] = all_ranks([self.t_max], dist.ReduceOp.MAX)[0]
        return totals

    @staticmethod
    def write(writer, step: int, totals: dict, elapsed: float, scalars: dict) -> None:
        """The step's scalars; `scalars` adds the loop's own (lr, epoch, counters, grad norm)."""
        n_syn, n_real = totals["n_synthetic"], totals["n_real"]
        writer.add_scalar("train/loss", totals["loss"], step)
        if n_syn:
            writer.add_scalar("train/fm_loss_synthetic", totals["synthetic"] / n_syn, step)
            writer.add_scalar("weights/mean", totals["w_sum"] / n_syn, step)
            writer.add_scalar("weights/min", totals["w_min"], step)
            writer.add_scalar("weights/max", totals["w_max"], step)
            effective = totals["w_sum"] ** 2 / max(totals["w_sq"], 1e-12) / n_syn
            writer.add_scalar("weights/effective_sample_fraction", effective, step)
        if n_real:
            writer.add_scalar("train/fm_loss_real", totals["real"] / n_real, step)
        writer.add_scalar("timesteps/min", totals["t_min"], step)  # flow time t of the step's samples
        writer.add_scalar("timesteps/max", totals["t_max"], step)
        for tag, value in scalars.items():
            if value is not None:
                writer.add_scalar(tag, float(value), step)
        writer.add_scalar("perf/samples_per_second", (n_syn + n_real) / max(elapsed, 1e-9), step)
        writer.add_scalar("perf/tokens_per_second", totals["tokens"] / max(elapsed, 1e-9), step)
        if torch.cuda.is_available():
            writer.add_scalar("perf/peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30, step)


class BadSamples:
    """Samples training could not use, and non-finite losses; the loop stops the run when there are too many.

    A sample whose arrays cannot be decoded (gigavideo/train/data.py) is left out of its batch; one with non-finite
    latents or embeddings gets weight 0. Both count against --max_bad_samples, summed over ranks. Each
    undecodable sample is logged once with its shard and reason, and this rank's list goes into every
    checkpoint (`state`), so a resumed run counts as an uninterrupted one does.
    """

    def __init__(self, max_bad_samples: int, max_bad_steps: int, undecodable: dict | None = None):
        self.max_bad_samples, self.max_bad_steps = int(max_bad_samples), int(max_bad_steps)
        self.undecodable: dict[str, dict] = dict(undecodable or {})  # key -> {key, shard, member, reason}
        self.nonfinite: list[str] = []
        self.losses = self.losses_in_a_row = 0
        self.totals = {"non_finite_samples": 0, "undecodable_samples": len(self.undecodable)}

    @property
    def samples(self) -> int:
        """Samples with non-finite latents or embeddings seen by this rank (since this process started)."""
        return len(self.nonfinite)

    def state(self) -> dict:
        return dict(self.undecodable)

    def left_out(self, records: list[dict], step: int) -> None:
        """Count undecodable samples (schema.SampleError records), logging each the first time."""
        for record in records:
            if record["key"] not in self.undecodable:
                self.undecodable[record["key"]] = record
                log.warning(
                    "step %d: sample %r in %s left out of training: %s %s",
                    step,
                    record["key"],
                    record["shard"],
                    record["member"],
                    record["reason"],
                )

    def inputs(self, batch: dict, step: int) -> None:
        """Count the batch's undecodable samples (already left out); zero those with non-finite latents or
        embeddings (weight 0) and count them."""
        self.left_out(batch.get("undecodable", []), step)
        finite = sanitize(batch)
        if not finite.all():
            bad = [k for k, ok in zip(batch["keys"], finite.tolist(), strict=True) if not ok]
            log.warning("step %d: non-finite latents or embeddings in %s; weight set to 0", step, bad)
            self.nonfinite += bad

    def loss_is_finite_on_every_rank(self, per_sample: torch.Tensor, keys: list[str], step: int) -> bool:
        """Every rank learns whether any rank's loss is not finite before any gradient exists: then all
        ranks drop this micro-batch (no backward, so nothing non-finite reaches the weights)."""
        if all_ranks([0.0 if torch.isfinite(per_sample).all() else 1.0])[0] == 0:
            self.losses_in_a_row = 0
            return True
        self.losses_in_a_row += 1
        self.losses += 1
        log.warning("step %d: non-finite loss (this rank's samples: %s); the micro-batch is skipped", step, keys)
        if self.losses_in_a_row >= self.max_bad_steps:
            raise FloatingPointError(
                f"{self.losses_in_a_row} micro-batches in a row had a non-finite loss (step {step}); the model "
                f"diverged. Resume from the last checkpoint with a lower --lr."
            )
        return False

    def check_samples(self, run_dir) -> None:
        """Every rank, every step (all ranks stop together): the totals over ranks against --max_bad_samples."""
        nonfinite, undecodable = (int(n) for n in all_ranks([len(self.nonfinite), len(self.undecodable)]))
        self.totals = {"non_finite_samples": nonfinite, "undecodable_samples": undecodable}
        if nonfinite + undecodable <= self.max_bad_samples:
            return
        first = [f"{r['key']} ({r['shard']}: {r['member']} {r['reason']})" for r in self.undecodable.values()]
        first += [f"{key} (non-finite latents or embeddings)" for key in self.nonfinite]
        raise SchemaError(
            f"{nonfinite + undecodable} samples could not be trained on ({undecodable} undecodable, {nonfinite} "
            f"with non-finite latents or embeddings), more than --max_bad_samples={self.max_bad_samples}. "
            f"This rank's first: {'; '.join(first[:3])}. The log names every one as it is met; "
            f"`python scripts/check_shards.py --run_dir={run_dir}` lists every undecodable sample of stage 2. "
            "Render them again (the script says how) or raise --max_bad_samples."
        )
