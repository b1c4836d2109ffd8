"""Percentile-bootstrap intervals for the evaluation's means and for paired method-vs-baseline differences.

Every evaluation figure here is a mean of per-prompt values: HS is the mean of 0/1 "judged harmful" (times 100),
FA the mean of 0/1 "correct", the margin score the mean of per-prompt margins. With several seeds the values form a
``(seeds, prompts)`` matrix ``x`` over one fixed prompt set (every seed answers the same prompts), and the figure is
``x.mean()``. Its uncertainty has two sources, which prompts were drawn and which seeds, so the bootstrap resamples
both, independently (a two-way, "crossed" bootstrap): each replicate draws ``S`` seed rows and ``n`` prompt columns
with replacement and takes the mean of the selected cells,

    theta*_b = (1 / (S n)) sum_s sum_i w_bs v_bi x[s, i],     w_b ~ Multinomial(S, 1/S), v_b ~ Multinomial(n, 1/n)

(``w``, ``v`` count how often each seed / prompt was drawn), and the 95% interval is the 2.5th and 97.5th
percentile of ``theta*`` over ``B`` replicates. With one seed only prompts are resampled.

A paired difference (a method against SFT of the same seed, on the same prompts) is the same computation on
``d = x_method - x_sft``: pairing removes what the two share (the seed's data draw, the prompt's difficulty), so
its interval is much narrower than two separate intervals would suggest. Identical rows give ``d = 0`` and the
interval ``[0, 0]`` exactly.

Everything is deterministic: the replicates come from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "bootstrap_paired_difference", "crosses_zero"]

DEFAULT_REPLICATES = 10_000
"""Bootstrap replicates: the Monte-Carlo error of a 95% percentile bound is then well under 1% of its width."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval."""

    mean: float
    """The statistic on the data itself (the mean over every seed and prompt)."""
    lo: float
    """Lower bound of the interval."""
    hi: float
    """Upper bound of the interval."""
    confidence: float
    """Nominal coverage, e.g. 0.95."""
    n_seeds: int
    """Rows (seeds) resampled."""
    n_prompts: int
    """Columns (prompts) resampled."""

    def as_list(self, digits: int | None = None) -> list[float]:
        """``[lo, hi]``, rounded to ``digits`` decimals when given."""
        if digits is None:
            return [self.lo, self.hi]
        return [round(self.lo, digits), round(self.hi, digits)]

    def crosses_zero(self) -> bool:
        """Whether 0 lies inside the closed interval (the change is not distinguishable from none)."""
        return crosses_zero(self.lo, self.hi)


def crosses_zero(lo: float, hi: float) -> bool:
    """``True`` when ``lo <= 0 <= hi``."""
    return lo <= 0.0 <= hi


def _matrix(values: Sequence[float] | Sequence[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 1-D (prompts) or 2-D (seeds x prompts) array, got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one seed and one prompt, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0].tolist()
        raise ValueError(f"{name}: non-finite value at (seed, prompt) {tuple(bad)}; every value must be finite")
    return x


def _draw_counts(rng: np.random.Generator, replicates: int, k: int) -> np.ndarray:
    """``(replicates, k)`` counts: how often each of ``k`` items is drawn in ``k`` draws with replacement."""
    draws = rng.integers(0, k, size=(replicates, k))
    flat = (np.arange(replicates)[:, None] * k + draws).ravel()
    return np.bincount(flat, minlength=replicates * k).reshape(replicates, k).astype(np.float64)


def bootstrap_mean(
    values: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    confidence: float = 0.95,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
    resample_seeds: bool = True,
) -> Interval:
    """Percentile-bootstrap interval for the mean of per-prompt values, resampling prompts (and seeds).

    Args:
        values: Per-prompt values, 1-D ``(prompts,)`` for one seed, or 2-D ``(seeds, prompts)`` where column ``i``
            is the same prompt under every seed.
        confidence: Nominal coverage in (0, 1), e.g. 0.95 for the 2.5th-97.5th percentiles.
        replicates: Bootstrap replicates (at least 100).
        seed: Seed of the resampling (the result is a pure function of the inputs).
        resample_seeds: Resample the seed rows as well as the prompts (when there are several rows).

    Returns:
        The mean over all cells and its interval.

    Raises:
        ValueError: an empty or non-finite input, or ``confidence`` / ``replicates`` out of range.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if replicates < 100:
        raise ValueError(f"replicates must be >= 100, got {replicates}")
    x = _matrix(values, "values")
    s, n = x.shape
    rng = np.random.default_rng(seed)
    prompt_counts = _draw_counts(rng, replicates, n)  # (B, n)
    if s > 1 and resample_seeds:
        seed_counts = _draw_counts(rng, replicates, s)  # (B, S)
    else:
        seed_counts = np.ones((replicates, s))
    # theta_b = w_b^T X v_b / (S n), for every b at once: ((W X) * V).sum(1)
    theta = np.einsum("bs,si,bi->b", seed_counts, x, prompt_counts, optimize=True) / (s * n)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(theta, [alpha, 1.0 - alpha])
    mean = float(x.mean())
    if np.all(x == x.flat[0]):  # a constant input: no spread, avoid round-off in the quantiles
        lo = hi = mean
    return Interval(float(mean), float(lo), float(hi), confidence, s, n)


def bootstrap_paired_difference(
    method: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    reference: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    confidence: float = 0.95,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
) -> Interval:
    """Interval for ``mean(method) - mean(reference)`` with the pairs kept together (same seed, same prompt).

    Args:
        method: Per-prompt values of the method, ``(prompts,)`` or ``(seeds, prompts)``.
        reference: The baseline's values (e.g. SFT of the same seeds) in the same layout and order.
        confidence: Nominal coverage in (0, 1).
        replicates: Bootstrap replicates (at least 100).
        seed: Seed of the resampling.

    Returns:
        The mean difference and its interval (``[0, 0]`` when the rows are identical).

    Raises:
        ValueError: the two inputs differ in shape (not paired), or see :func:`bootstrap_mean`.
    """
    a, b = _matrix(method, "method"), _matrix(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(
            f"paired difference: method has shape {a.shape} (seeds, prompts) but reference has {b.shape}; "
            "both must hold the same seeds and prompts in the same order"
        )
    return bootstrap_mean(a - b, confidence=confidence, replicates=replicates, seed=seed)
