"""Paired bootstrap on synthetic scores whose answer is known."""

import numpy as np
import pytest

from gigavideo.eval.stats import paired_bootstrap


def test_constant_improvement_has_a_zero_width_interval():
    base = np.linspace(0.1, 0.8, 50)
    r = paired_bootstrap(base, base + 0.1, samples=500)
    assert r["difference"] == pytest.approx(0.1)
    assert r["ci_low"] == pytest.approx(0.1) and r["ci_high"] == pytest.approx(0.1)


def test_interval_matches_the_normal_theory_for_known_noise():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 400)
    tuned = base + 0.05 + rng.normal(0, 0.2, 400)  # true difference 0.05, sd 0.2
    r = paired_bootstrap(base, tuned, samples=4000, seed=2)
    half_width = 1.96 * 0.2 / np.sqrt(400)
    assert r["ci_low"] < 0.05 < r["ci_high"]
    assert (r["ci_high"] - r["ci_low"]) / 2 == pytest.approx(half_width, rel=0.15)
    assert r["n"] == 400


def test_unpaired_inputs_are_rejected():
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([0.1, 0.2], [0.3])
