"""How far the vessel probabilities are from frequencies: the reliability of the FOV pixels' probabilities in
equal-width bins, and its expected calibration error.

A model is calibrated where, of the pixels it gives probability p, a fraction p are vessel. Bin b holds the
probabilities in [b/B, (b+1)/B) (the last bin 1 too); its confidence is their mean and its frequency the fraction
of them that are vessel. ECE = sum_b (n_b / N) |frequency_b - confidence_b| (Naeini et al., AAAI 2015; Guo et
al., ICML 2017), here of the vessel probability itself (not of the top label), as a reliability diagram of a
binary segmentation plots it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retinaseg.evaluation.counts import ratio

ECE_BINS = 15


@dataclass(frozen=True)
class Reliability:
    """Per bin: the number of pixels, the sum of their probabilities and the number of them that are vessel."""

    count: np.ndarray
    probability_sum: np.ndarray
    positive: np.ndarray

    @classmethod
    def of(cls, probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
        """The bins of probabilities `probs` against boolean `labels` (the pixels given: the FOV's)."""
        probs, labels = np.asarray(probs, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
        index = np.minimum((probs * bins).astype(np.int64), bins - 1)
        return cls(
            np.bincount(index, minlength=bins),
            np.bincount(index, weights=probs, minlength=bins),
            np.bincount(index[labels], minlength=bins),
        )

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0, 1, len(self.count) + 1)

    @property
    def confidence(self) -> np.ndarray:
        """Mean probability of each bin (0 for an empty bin)."""
        return ratio(self.probability_sum, self.count)

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of vessel pixels in each bin (0 for an empty bin)."""
        return ratio(self.positive, self.count)

    @property
    def ece(self) -> float:
        """The expected calibration error: the pixel-weighted mean gap between frequency and confidence."""
        weights = ratio(self.count, self.count.sum())
        return float(np.sum(weights * np.abs(self.frequency - self.confidence)))
