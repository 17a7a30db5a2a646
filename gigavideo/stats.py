"""Paired comparison with a bootstrap confidence interval (baseline vs fine-tuned on the same prompts)."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(baseline, finetuned, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of (finetuned - baseline) over paired items, with a percentile bootstrap interval."""
    base, tuned = np.asarray(baseline, dtype=float), np.asarray(finetuned, dtype=float)
    if base.shape != tuned.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError(f"paired scores need two equal, non-empty 1-d arrays, got {base.shape} and {tuned.shape}")
    diff = tuned - base
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {
        "n": int(len(diff)),
        "baseline": float(base.mean()),
        "finetuned": float(tuned.mean()),
        "difference": float(diff.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "level": level,
    }
