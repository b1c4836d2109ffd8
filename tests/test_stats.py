"""``asft_lightning.stats``: the bootstrap against closed forms on synthetic data, pairing, determinism, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asft_lightning.stats import Interval, bootstrap_mean, bootstrap_paired_difference, crosses_zero


def _normal_half_width(x: np.ndarray) -> float:
    return 1.959964 * float(x.std(ddof=0)) / math.sqrt(x.size)


def test_normal_sample_matches_the_normal_interval():
    """For a large sample the percentile interval of the mean is mean +- 1.96 sd / sqrt(n)."""
    x = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    ci = bootstrap_mean(x, replicates=10_000, seed=0)
    half = _normal_half_width(x)
    assert ci.mean == pytest.approx(float(x.mean()), abs=1e-12)
    assert ci.lo == pytest.approx(x.mean() - half, abs=0.05 * half)
    assert ci.hi == pytest.approx(x.mean() + half, abs=0.05 * half)
    assert (ci.n_seeds, ci.n_prompts, ci.confidence) == (1, 2000, 0.95)


def test_bernoulli_rate_matches_the_wald_interval():
    """A harmful score: 0/1 verdicts in percent; the interval is p +- 1.96 sqrt(p (1 - p) / n)."""
    x = 100.0 * (np.random.default_rng(2).random(2000) < 0.2)
    ci = bootstrap_mean(x, replicates=10_000, seed=5)
    p = x.mean() / 100
    half = 100 * 1.959964 * math.sqrt(p * (1 - p) / x.size)
    assert ci.lo == pytest.approx(x.mean() - half, abs=0.05 * half)
    assert ci.hi == pytest.approx(x.mean() + half, abs=0.05 * half)


def test_seed_level_resampling_matches_the_interval_over_seeds():
    """Values that vary only by seed: the interval is the one of the mean of the seed means (many seeds)."""
    rng = np.random.default_rng(3)
    seed_effect = rng.normal(0.0, 1.0, size=1000)
    x = np.repeat(seed_effect[:, None], 5, axis=1)  # (1000 seeds, 5 prompts), constant along prompts
    ci = bootstrap_mean(x, replicates=10_000, seed=1)
    half = _normal_half_width(seed_effect)
    assert ci.lo == pytest.approx(seed_effect.mean() - half, abs=0.05 * half)
    assert ci.hi == pytest.approx(seed_effect.mean() + half, abs=0.05 * half)
    # Resampling prompts alone sees no spread at all here.
    only_prompts = bootstrap_mean(x, replicates=1000, resample_seeds=False)
    assert only_prompts.hi - only_prompts.lo == pytest.approx(0.0, abs=1e-12)


def test_two_way_resampling_adds_the_seed_variance():
    """Crossed design x = a_s + b_i: the bootstrap variance is about var(a)/S + var(b)/n."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1.0, size=200), rng.normal(0, 3.0, size=300)
    x = a[:, None] + b[None, :]
    ci = bootstrap_mean(x, replicates=20_000, seed=2)
    half = 1.959964 * math.sqrt(a.var() / a.size + b.var() / b.size)
    assert (ci.hi - ci.lo) / 2 == pytest.approx(half, rel=0.05)


def test_paired_difference_of_identical_rows_is_exactly_zero():
    x = np.random.default_rng(5).random((3, 50))
    d = bootstrap_paired_difference(x, x.copy())
    assert (d.mean, d.lo, d.hi) == (0.0, 0.0, 0.0)
    assert d.as_list() == [0.0, 0.0] and d.crosses_zero()


def test_paired_difference_removes_the_shared_prompt_difficulty():
    """A method that is 2 points better on every prompt: the paired interval is [-2, -2], not two wide ones."""
    rng = np.random.default_rng(6)
    base = rng.normal(20.0, 10.0, size=(3, 100))
    d = bootstrap_paired_difference(base - 2.0, base)
    assert d.mean == pytest.approx(-2.0) and d.lo == pytest.approx(-2.0) and d.hi == pytest.approx(-2.0)
    assert not d.crosses_zero()
    separate = bootstrap_mean(base)
    assert separate.hi - separate.lo > 1.0  # unpaired, the same shift would be lost in the spread


def test_deterministic_per_seed_and_interval_helpers():
    x = np.random.default_rng(7).random(200)
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    assert bootstrap_mean(x, seed=3) != bootstrap_mean(x, seed=4)
    ci = Interval(1.0, 0.123456, 2.5, 0.95, 1, 10)
    assert ci.as_list(2) == [0.12, 2.5] and not ci.crosses_zero()
    assert crosses_zero(-1.0, 0.5) and crosses_zero(0.0, 1.0) and not crosses_zero(0.1, 1.0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"method has shape \(2, 3\).*reference has \(3, 3\)"):
        bootstrap_paired_difference(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"non-finite value at \(seed, prompt\) \(0, 1\)"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one seed and one prompt"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_mean([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="replicates must be >= 100"):
        bootstrap_mean([1.0, 2.0], replicates=10)
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        bootstrap_mean(np.zeros((2, 2, 2)))
