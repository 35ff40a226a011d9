"""The pixel counts every pooled metric of the DRIVE table follows from, inside the field of view: the confusion
at the threshold and class-conditional histograms of the probabilities (AUC), one entry per image, and the names
of the metrics. Plain numpy: summing per-image counts with weights scores any set of images, each counted any
number of times, without the model (what the bootstrap of retinaseg.evaluation.stats does).
docs/evaluation.md, "Metrics and statistics", gives each formula and its reference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The keys of metrics.json; sensitivity is recall under the name the DRIVE literature uses.
REPORTED = ("f1", "auc", "accuracy", "sensitivity", "specificity", "precision", "recall", "iou")
# Vessel topology at the threshold, inside the FOV.
TOPOLOGY = ("cldice", "topology_precision", "topology_sensitivity", "betti0_error")
# The pooled metrics of an evaluation, each with a bootstrap interval.
HEADLINE = REPORTED + TOPOLOGY
# How tables name them, with their decimals (recall is sensitivity under its other name: not shown twice).
DISPLAY = {
    "f1": ("F1", 4),
    "auc": ("AUC", 4),
    "accuracy": ("Accuracy", 4),
    "sensitivity": ("Sensitivity", 4),
    "specificity": ("Specificity", 4),
    "precision": ("Precision", 4),
    "iou": ("IoU", 4),
    "cldice": ("clDice", 4),
    "topology_precision": ("topology precision", 4),
    "topology_sensitivity": ("topology sensitivity", 4),
    "betti0_error": ("Betti-0 error", 2),
}

# AUC histograms: 2**16 bins uniform in logit over [-20, 20] (beyond: the first and last bin), so that the tails,
# where a trained model puts most pixels, get bins as fine as the middle. Only a vessel and a background pixel in
# the same bin can be ordered wrongly (they count as a tie), so the histograms' AUC is within
# sum_b pos_b * neg_b / (2 * P * N) of the exact one: 5e-6 for a 16-channel drive_cpu model on DRIVE's test set
# (its actual error 2e-8), where 4096 bins uniform in probability allow 8e-4.
HISTOGRAM_BINS = 2**16
HISTOGRAM_LOGIT_RANGE = 20.0


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (torchmetrics' zero_division)."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    return np.divide(
        numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape), where=denominator > 0
    )


@dataclass(frozen=True)
class Confusion:
    """Pixel counts at the threshold, each an array with one entry per image."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    @classmethod
    def of(cls, predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Confusion:
        """The counts of each boolean prediction against its boolean label, over the pixels given (the FOV's)."""
        rows = [((p & t).sum(), (p & ~t).sum(), (~p & t).sum(), (~p & ~t).sum()) for p, t in zip(predictions, labels)]
        return cls(*np.array(rows, dtype=np.int64).reshape(-1, 4).T)

    def pooled(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """The threshold metrics of REPORTED, counts summed over the images with `weights` (..., n)."""
        tp, fp, fn, tn = (weights @ count for count in (self.tp, self.fp, self.fn, self.tn))
        recall = ratio(tp, tp + fn)
        return {
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy": ratio(tp + tn, tp + fp + fn + tn),
            "sensitivity": recall,
            "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp),
            "recall": recall,
            "iou": ratio(tp, tp + fp + fn),
        }


def histogram_edges(bins: int = HISTOGRAM_BINS, logit_range: float = HISTOGRAM_LOGIT_RANGE) -> np.ndarray:
    """Probability edges of `bins` bins uniform in logit over [-logit_range, logit_range], the outer edges
    widened to 0 and 1: bin b holds probabilities in [edges[b], edges[b + 1]), the last one 1 too."""
    edges = 1 / (1 + np.exp(-np.linspace(-logit_range, logit_range, bins + 1)))
    edges[0], edges[-1] = 0.0, 1.0
    return edges


@dataclass(frozen=True)
class Histograms:
    """Class-conditional histograms of the probabilities: per image (rows), the number of vessel (`positive`) and
    background (`negative`) pixels in each bin (columns) of `histogram_edges(columns, logit_range)`."""

    positive: np.ndarray
    negative: np.ndarray
    logit_range: float = HISTOGRAM_LOGIT_RANGE

    @classmethod
    def of(
        cls,
        probs: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        bins: int = HISTOGRAM_BINS,
        logit_range: float = HISTOGRAM_LOGIT_RANGE,
    ) -> Histograms:
        """The histograms of each image's probabilities against its boolean label (the pixels given: the FOV's)."""
        edges = histogram_edges(bins, logit_range)
        positive, negative = np.zeros((len(probs), bins), np.int64), np.zeros((len(probs), bins), np.int64)
        for i, (p, t) in enumerate(zip(probs, labels)):
            index = np.searchsorted(edges[1:-1], p, side="right")
            positive[i], negative[i] = np.bincount(index[t], minlength=bins), np.bincount(index[~t], minlength=bins)
        return cls(positive, negative, logit_range)

    def same_bins(self, other: Histograms) -> bool:
        return self.positive.shape[1] == other.positive.shape[1] and self.logit_range == other.logit_range

    @functools.cached_property
    def ordered_pairs(self) -> np.ndarray:
        """(n, n): pairs of a vessel pixel of image i and a background pixel of image j that the probabilities order
        correctly (the vessel pixel in a higher bin), a pair in the same bin counting one half."""
        below = np.cumsum(self.negative, axis=1, dtype=float) - self.negative / 2
        # einsum's own loop: a BLAS product of these long rows took from 0.05 to 5 s on a loaded 2-core machine.
        return np.einsum("ik,jk->ij", self.positive.astype(float), below)

    def pooled(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """The AUC of the images' pooled histograms (Mann-Whitney U / (P * N)) with `weights` (..., n)."""
        pairs = ((weights @ self.ordered_pairs) * weights).sum(axis=-1)
        positives, negatives = weights @ self.positive.sum(axis=1), weights @ self.negative.sum(axis=1)
        return {"auc": ratio(pairs, positives * negatives)}
