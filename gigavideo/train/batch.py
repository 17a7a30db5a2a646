"""The batch and the run's length as the paper states them: a global batch (4) and epochs (1) over the scored
samples, whatever the number of processes. Each rank's gradient accumulation is derived from them, never set, so
a job on 8 GPUs trains the same run as one on 1 (and a resume on another number of GPUs goes on with it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gigavideo.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int  # samples per rank and forward pass
    grad_accum: int  # micro-batches per rank and optimizer step
    global_batch_size: int  # samples per optimizer step, over every rank

    def length(self, samples: int, epochs: float, max_steps: int = 0) -> dict:
        """This plan with the run's length: optimizer steps for `epochs` passes over `samples` (capped by
        max_steps where it is > 0), and the samples they see."""
        steps = max(1, math.ceil(epochs * samples / self.global_batch_size))
        if max_steps > 0:
            steps = min(steps, max_steps)
        seen = steps * self.global_batch_size
        return asdict(self) | {
            "samples": samples,
            "steps": steps,
            "samples_seen": seen,
            "epochs": round(seen / samples, 4) if samples else 0.0,
        }


def plan_batch(train_cfg, world_size: int) -> BatchPlan:
    """train.batch_size (global) over world_size ranks of train.micro_batch_size; a ConfigError naming the three
    numbers and what would work where the global batch cannot be made from them."""
    batch, micro = int(train_cfg["batch_size"]), int(train_cfg["micro_batch_size"])
    per_pass = micro * world_size
    if batch % per_pass == 0:
        return BatchPlan(world_size, micro, batch // per_pass, batch)
    worlds = [w for w in range(1, batch // micro + 1) if batch % (micro * w) == 0]
    counts = ", ".join(map(str, worlds[:-1])) + (" or " if len(worlds) > 1 else "") + str(worlds[-1]) if worlds else ""
    fixes = [f"run {counts} processes"] if worlds else []
    fixes.append(f"set --batch_size={per_pass} (or {2 * per_pass})")
    if micro > 1:
        fixes.append("lower --micro_batch_size")
    raise ConfigError(
        f"train.batch_size = {batch} (the global batch) cannot be made by {world_size} processes x micro_batch_size "
        f"{micro}: it must be a multiple of {per_pass}; {', or '.join(fixes)}"
    )


def describe(batch: BatchPlan | dict) -> str:
    """One line: how the global batch is made (and, for a `length`, how long the run is)."""
    b = asdict(batch) if isinstance(batch, BatchPlan) else batch
    text = (
        f"global batch {b['global_batch_size']} = {plural(b['world_size'], 'process', 'es')} x micro-batch "
        f"{b['micro_batch_size']} x accumulation {b['grad_accum']}"
    )
    if "steps" in b:
        text += (
            f"; {plural(b['steps'], 'step')} = {plural(b['epochs'], 'epoch')} of {b['samples']} samples "
            f"({b['samples_seen']} seen)"
        )
    return text


def plural(count, word: str, ending: str = "s") -> str:
    return f"{count:g} {word}{'' if count == 1 else ending}"
