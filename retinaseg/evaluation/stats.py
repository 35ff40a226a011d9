"""How sure a metric pooled over a few images is: bootstrap intervals over images, and the paired comparison of
two evaluations of the same images. Plain numpy, usable outside evaluation.

The images are the unit that was sampled (DRIVE's 20 test photographs), so they are what is resampled. Every
function takes the metrics as a `statistic`: a function of image weights, `statistic(weights)` with weights of
shape (R, n) (how many times each of the n images counts, in each of R resamples) returning, by metric name,
arrays of shape (R,). `retinaseg.evaluation.scoring.ImageCounts.pooled` is one: it sums per-image counts with the weights,
so each resample costs a matrix product instead of a pass over the pixels.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from retinaseg.core.errors import ConfigError, check_int

Statistic = Callable[[np.ndarray], dict[str, np.ndarray]]

# The fewest resamples that give a 95% interval: the 2.5th and 97.5th percentiles of fewer are one or two
# resampled values (with 1 or 2 resamples the "interval" need not even hold the estimate).
MIN_RESAMPLES = 200

# Two floating-point sums of the same numbers in another order may differ in their last bits: a resampled
# difference this close to the observed one counts as equal to it.
TIE_TOLERANCE = 1e-12


def check_resamples(name: str, resamples) -> int:
    """`resamples` (setting `name`) if it is 0 (no intervals) or at least MIN_RESAMPLES, else a ConfigError."""
    check_int(name, resamples, minimum=0)
    if 0 < resamples < MIN_RESAMPLES:
        raise ConfigError(
            f"{name}={resamples} resamples are too few for a 95% interval: use at least {MIN_RESAMPLES} (2000 is "
            f"the default), or {name}=0 for no intervals."
        )
    return resamples


def resample_weights(n_images: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n_images): how many times each image is drawn in each bootstrap resample of n_images draws
    with replacement."""
    return rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=resamples).astype(float)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of the resampled values (the percentile bootstrap interval)."""
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_intervals(
    statistic: Statistic, n_images: int, resamples: int, seed: int, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric of `statistic` over `resamples` resamples of the n_images
    images (seeded: the same seed draws the same resamples)."""
    weights = resample_weights(n_images, resamples, np.random.default_rng(seed))
    return {key: percentile_interval(values, level) for key, values in statistic(weights).items()}


@dataclass(frozen=True)
class PairedDifference:
    """One metric of evaluations a and b of the same images: their values, b - a, the paired-bootstrap interval
    of b - a and the two-sided p-value of the swap test (None without resamples)."""

    a: float
    b: float
    difference: float
    ci: tuple[float, float] | None
    p_value: float | None

    def to_json(self) -> dict:
        """As comparison.json and metrics.json write it: a, b, difference, ci95 ([low, high] or null), p_value."""
        ci = None if self.ci is None else list(self.ci)
        return {"a": self.a, "b": self.b, "difference": self.difference, "ci95": ci, "p_value": self.p_value}


def paired_comparison(
    statistic: Statistic, n_images: int, resamples: int, seed: int, level: float = 0.95
) -> dict[str, PairedDifference]:
    """Compare evaluations a and b of the same n_images images, for each metric of `statistic`.

    `statistic` takes weights over 2 * n_images images: a's n_images first, then b's, image i of a and image
    n_images + i of b being the same photograph (`ImageCounts.concatenate(a, b).pooled`).

    Interval: paired bootstrap. Each of `resamples` resamples draws images with replacement and scores a and b on
    the same draw; the interval is the percentiles of b - a.
    p-value: paired permutation (sign-flip) test of "a and b are exchangeable on every image". Each of `resamples`
    permutations swaps a's and b's result on each image with probability 1/2 and scores the difference;
    p = (1 + #{|swapped difference| >= |observed difference|}) / (1 + resamples), so never below
    1 / (1 + resamples). Seeded: the same seed draws the same resamples and swaps.
    """
    observed = statistic(np.repeat(np.eye(2), n_images, axis=1))  # row 0: a's images, row 1: b's
    if resamples > 0:
        rng = np.random.default_rng(seed)
        weights = resample_weights(n_images, resamples, rng)
        on_a, on_b = statistic(np.hstack([weights, 0 * weights])), statistic(np.hstack([0 * weights, weights]))
        swap = (rng.random((resamples, n_images)) < 0.5).astype(float)
        swapped_a, swapped_b = statistic(np.hstack([1 - swap, swap])), statistic(np.hstack([swap, 1 - swap]))
    result = {}
    for key, values in observed.items():
        a, b = float(values[0]), float(values[1])
        ci = p_value = None
        if resamples > 0:
            ci = percentile_interval(on_b[key] - on_a[key], level)
            extreme = np.abs(swapped_b[key] - swapped_a[key]) >= abs(b - a) - TIE_TOLERANCE
            p_value = float((1 + extreme.sum()) / (1 + resamples))
        result[key] = PairedDifference(a, b, b - a, ci, p_value)
    return result
