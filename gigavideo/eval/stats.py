"""Means with percentile bootstrap intervals: of one set of scores, and of paired differences (baseline vs
fine-tuned on the same prompts and seeds)."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(baseline, finetuned, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of (finetuned - baseline) over paired items, with a percentile bootstrap interval."""
    base, tuned = np.asarray(baseline, dtype=float), np.asarray(finetuned, dtype=float)
    if base.shape != tuned.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError(f"paired scores need two equal, non-empty 1-d arrays, got {base.shape} and {tuned.shape}")
    diff = bootstrap_mean(tuned - base, samples, seed, level)
    return {
        "n": diff["n"],
        "baseline": float(base.mean()),
        "finetuned": float(tuned.mean()),
        "difference": diff["mean"],
        "ci_low": diff["ci_low"],
        "ci_high": diff["ci_high"],
        "level": level,
    }


def bootstrap_mean(values, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The mean of values, with a percentile bootstrap interval."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"a bootstrap mean needs a non-empty 1-d array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {
        "n": int(len(values)),
        "mean": float(values.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "level": level,
    }
