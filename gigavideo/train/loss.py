"""The reward-weighted flow-matching objective with the realism constraint.

    L = mean_i  w_i * || v_theta(z_t, p, t) - (eps - z_0) ||^2,   z_t = (1 - t) z_0 + t eps

For a synthetic sample w_i is its stage-3 reward mapped to a weight (below); for a real-caption
sample z_0 is the latent of the paired real video and w_i is the realism weight (unweighted by
reward; 0 disables the constraint).
"""

from __future__ import annotations

import math

import torch

from gigavideo.errors import ConfigError

WEIGHT_MAPPINGS = ("raw", "normalized", "exp", "threshold", "uniform", "advantage")


def reward_weights(
    rewards: dict[str, float], mapping: str, temperature: float = 1.0, threshold: float = 0.5
) -> dict[str, float]:
    """Map all rewards to training weights at once (offline), since some mappings use dataset statistics.

    raw: w = r (the paper's formula). normalized: w = r / mean(r), so the mean weight is 1 and the
    learning rate keeps its meaning. exp: w = exp(r / T) / mean(exp(r / T)) (reward-weighted
    regression). threshold: w = 1 if r >= threshold else 0. uniform: w = 1 (plain fine-tuning).
    advantage: w = max(0, r - mean(r)) / mean(max(0, r - mean(r))): only the samples better than the model's
    own average train, with a mean weight of 1 (all 0 when every reward is the same: nothing is better).
    """
    if mapping not in WEIGHT_MAPPINGS:
        raise ConfigError(f"weight mapping {mapping!r} not in {WEIGHT_MAPPINGS}")
    if not rewards:
        return {}
    values = list(rewards.values())
    if mapping == "raw":
        return dict(rewards)
    if mapping == "uniform":
        return dict.fromkeys(rewards, 1.0)
    if mapping == "threshold":
        return {k: float(r >= threshold) for k, r in rewards.items()}
    if mapping == "normalized":
        mean = sum(values) / len(values)
        return {k: (r / mean if mean > 0 else 0.0) for k, r in rewards.items()}
    if mapping == "advantage":
        mean = sum(values) / len(values)
        gains = {k: max(0.0, r - mean) for k, r in rewards.items()}
        scale = sum(gains.values()) / len(gains)
        return {k: (g / scale if scale > 0 else 0.0) for k, g in gains.items()}
    if temperature <= 0:
        raise ConfigError(f"exp weight mapping needs a positive temperature, got {temperature}")
    top = max(values)  # subtract the max before exp for stability; the ratio is unchanged
    exps = {k: math.exp((r - top) / temperature) for k, r in rewards.items()}
    mean = sum(exps.values()) / len(exps)
    return {k: e / mean for k, e in exps.items()}


def sample_timesteps(
    n: int,
    method: str,
    shift: float,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    t_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """t in (0, 1), as Wan trains: uniform or logit-normal, then the flow shift t' = s t / (1 + (s - 1) t).

    t_range = (lo, hi) draws from the same distribution conditioned on lo <= t' < hi (an expert's side of
    Wan2.2's boundary), exactly, by inverting the distribution function on that interval.
    """
    if method not in ("uniform", "logit_normal"):
        raise ConfigError(f"timestep sampling {method!r} not in ('uniform', 'logit_normal')")
    lo, hi = (float(x) for x in t_range)
    if (lo, hi) == (0.0, 1.0):
        if method == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
        return shift * u / (1 + (shift - 1) * u)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"timestep range {t_range} is not an interval of [0, 1]")

    def unshifted(t: float) -> float:
        return t / (shift - (shift - 1) * t)

    def cdf(u: torch.Tensor) -> torch.Tensor:  # of the unshifted u
        return u if method == "uniform" else torch.special.ndtr((torch.logit(u) - logit_mean) / logit_std)

    def inverse_cdf(r: torch.Tensor) -> torch.Tensor:
        return r if method == "uniform" else torch.sigmoid(torch.special.ndtri(r) * logit_std + logit_mean)

    r_lo, r_hi = cdf(torch.tensor([unshifted(lo), unshifted(hi)], dtype=torch.float64))
    u = inverse_cdf(r_lo + (r_hi - r_lo) * torch.rand(n, generator=generator, dtype=torch.float64))
    t = shift * u / (1 + (shift - 1) * u)
    below_hi = hi if hi == 1.0 else torch.nextafter(torch.tensor(hi), torch.tensor(0.0)).item()
    return t.clamp(lo, below_hi).float()  # rounding never crosses the boundary


def noisy_latents_and_target(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    t_ = t.view(-1, *([1] * (z0.dim() - 1))).to(z0.dtype)
    return (1 - t_) * z0 + t_ * noise, noise - z0


def per_sample_flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def weighted_loss(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of w_i * l_i."""
    return (weights.to(per_sample) * per_sample).mean()


class Anchor:
    """A frozen reference model's velocity: the objective adds weight * the mean over the batch of
    ||v_theta - v_anchor||^2 on its generated samples (real clips have the realism loss), so that later rounds stay
    near the model they started from. `distances` keeps the last batch's per-sample distances (0 for real clips)."""

    def __init__(self, model, weight: float):
        self.model, self.weight = model.eval().requires_grad_(False), float(weight)
        self.distances: torch.Tensor | None = None

    def term(self, prediction: torch.Tensor, inputs: dict, generated: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reference = self.model(**inputs, return_dict=False)[0]
        distances = per_sample_flow_matching_loss(prediction, reference) * generated.to(prediction.device)
        self.distances = distances.detach()
        return self.weight * distances.mean()


def batch_loss(
    model,
    z0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    weights: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    dtype=torch.float32,
    timestep: torch.Tensor | None = None,
    anchor: Anchor | None = None,
    generated: torch.Tensor | None = None,
):
    """The objective on one batch: (weighted loss, per-sample flow-matching losses).

    The transformer sees z_t and `timestep`, the family's form of t (Wan: t * 1000, the default), and
    predicts eps - z_0. With an anchor, its term on the `generated` samples (a boolean mask) is added.
    """
    device = weights.device
    z_t, target = noisy_latents_and_target(z0, noise, t)
    inputs = {
        "hidden_states": z_t.to(device, dtype),
        "timestep": (t * 1000 if timestep is None else timestep).to(device),
        "encoder_hidden_states": prompt_embeds.to(device, dtype),
    }
    prediction = model(**inputs, return_dict=False)[0]
    per_sample = per_sample_flow_matching_loss(prediction, target.to(device))
    loss = weighted_loss(per_sample, weights)
    if anchor is not None:
        loss = loss + anchor.term(prediction, inputs, generated)
    return loss, per_sample
