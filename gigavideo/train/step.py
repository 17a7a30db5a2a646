"""One training step of the flow-matching objective, the same for stage 4, the toy world's pre-training and
bench/train_step.py's baseline: the loss of `batch_loss`, then the engine's backward and step.

The engine is DeepSpeed's for stage 4; `PlainEngine` gives a bare torch module and optimizer the same three
calls (forward, backward, step), so the pre-training and the baseline differ from stage 4 only in the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gigavideo.train.loss import batch_loss


class PlainEngine:
    """A torch module and optimizer behind DeepSpeed's engine calls: step() clips the gradient norm to `clip`
    (0: no clipping), sets the learning rate to lr * lr_factor(step) when a schedule is given, steps the
    optimizer and zeroes the gradients."""

    def __init__(self, module, optimizer, clip: float = 0.0, lr_factor: Callable[[int], float] | None = None):
        self.module, self.optimizer, self.clip, self.lr_factor = module, optimizer, clip, lr_factor
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.global_steps = 0  # optimizer steps taken (a resumed run sets it)
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.clip)
        if self.lr_factor is not None:
            for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = float(lr * self.lr_factor(self.global_steps))
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.global_steps += 1


def flow_matching_step(engine, *batch, accept: Callable[[torch.Tensor], bool] | None = None, **objective):
    """One micro-batch: `batch_loss(engine, *batch, **objective)` (z0, prompt embeddings, weights, t, noise, ...),
    backward, step. accept(per_sample losses) may refuse the batch before backward (stage 4 refuses a non-finite
    loss); then nothing is updated and None is returned, else (loss, per-sample losses)."""
    loss, per_sample = batch_loss(engine, *batch, **objective)
    if accept is not None and not accept(per_sample):
        return None
    engine.backward(loss)
    engine.step()
    return loss, per_sample
