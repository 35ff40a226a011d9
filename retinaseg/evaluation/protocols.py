"""An evaluation scored the way other papers score theirs, from its histograms alone (histograms.npz: each image's
vessel and background pixels counted in fine probability bins, inside and outside the FOV).

A protocol says which pixels count and how images combine:
- region `fov`: the pixels inside the FOV mask (the DRIVE protocol, retinaseg's own);
- region `whole_image`: every pixel of the image, with the model's probabilities outside the FOV too;
- region `fov_multiplied`: every pixel, the prediction multiplied by the FOV mask first (outside: probability 0);
- `pooled`: the pixel counts of all images summed, then the metric; `mean_per_image`: the metric of each image,
  then their mean.
`pad_to` (H, W) adds, to each image, the background pixels of zero padding up to that size at probability 0
(a project that scores its zero-padded network input).

Thresholds are the bins' edges (2**16 bins uniform in logit: a threshold lands within 6e-4 in logit of the one
asked; 0.5 is an edge), a pixel counting as vessel from the edge up. Any protocol, threshold and set of images
is a few sums over the bins, so thresholds can be chosen on one evaluation (the training images) and applied to
another, and every metric gets a bootstrap interval over images (retinaseg.evaluation.stats).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retinaseg.core.errors import DataError
from retinaseg.evaluation import stats
from retinaseg.evaluation.counts import Confusion, Histograms, histogram_edges, ratio

REGIONS = ("fov", "whole_image", "fov_multiplied")
AVERAGING = ("pooled", "mean_per_image")
PROTOCOLS = tuple(f"{region}_{averaging}" for region in REGIONS for averaging in AVERAGING)
# Metrics of the confusion at a threshold (mcc: Matthews; miou, mdice: the mean of vessel's and background's IoU
# and Dice, as mmsegmentation's mDice and FSG-Net's mIoU count), and the threshold-free AUC.
THRESHOLD_METRICS = ("f1", "accuracy", "sensitivity", "specificity", "precision", "iou", "mcc", "miou", "mdice")
METRICS = (*THRESHOLD_METRICS, "auc")


@dataclass(frozen=True)
class Protocol:
    region: str
    averaging: str
    pad_to: tuple[int, int] | None = None

    @classmethod
    def named(cls, name: str, pad_to: tuple[int, int] | None = None) -> Protocol:
        """The protocol `<region>_<averaging>` (one of PROTOCOLS)."""
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}: one of {', '.join(PROTOCOLS)}")
        region, averaging = next((r, a) for r in REGIONS for a in AVERAGING if name == f"{r}_{a}")
        return cls(region, averaging, None if pad_to is None else (int(pad_to[0]), int(pad_to[1])))


@dataclass(frozen=True)
class ImageHistograms:
    """An evaluation's histograms (retinaseg.evaluation.directory reads them): per image (rows), vessel and
    background pixels in each probability bin, inside the FOV and (None for an evaluation written before retinaseg
    recorded them) outside it."""

    ids: tuple[str, ...]
    inside: Histograms
    outside: Histograms | None

    def scored(self, protocol: Protocol) -> Histograms:
        """The histograms of the pixels `protocol` scores, at the probabilities it scores them with."""
        if protocol.region == "fov" and protocol.pad_to is None:
            return self.inside
        if self.outside is None:
            raise DataError(
                "this evaluation recorded no pixels outside the FOV (an older retinaseg.eval): evaluate its "
                "checkpoint again to score whole images"
            )
        positive, negative = self.inside.positive.copy(), self.inside.negative.copy()
        if protocol.region == "whole_image":
            positive += self.outside.positive
            negative += self.outside.negative
        elif protocol.region == "fov_multiplied":  # outside the FOV the prediction is 0
            positive[:, 0] += self.outside.positive.sum(axis=1)
            negative[:, 0] += self.outside.negative.sum(axis=1)
        if protocol.pad_to is not None:
            pixels = self.inside.positive.sum(axis=1) + self.inside.negative.sum(axis=1)
            pixels += self.outside.positive.sum(axis=1) + self.outside.negative.sum(axis=1)
            padding = protocol.pad_to[0] * protocol.pad_to[1] - pixels
            if (padding < 0).any():
                raise DataError(f"the images hold more pixels than padding to {protocol.pad_to} gives")
            negative[:, 0] += padding
        return Histograms(positive, negative, self.inside.logit_range)


def edges(histograms: Histograms) -> np.ndarray:
    """The probability edges of `histograms`' bins."""
    return histogram_edges(histograms.positive.shape[1], histograms.logit_range)


def threshold_index(histograms: Histograms, threshold: float) -> int:
    """The bin from which pixels count as vessel at `threshold`: the first edge at or above it."""
    return int(np.clip(np.searchsorted(edges(histograms), threshold, side="left"), 1, histograms.positive.shape[1] - 1))


def from_bin(counts: np.ndarray) -> np.ndarray:
    """(n, bins): per image, the pixels in each bin and above (those called vessel from that bin's edge up)."""
    return np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]


def confusion_at(histograms: Histograms, index: int) -> Confusion:
    """Each image's pixel counts with the pixels from bin `index` up called vessel."""
    tp, fp = histograms.positive[:, index:].sum(axis=1), histograms.negative[:, index:].sum(axis=1)
    return Confusion(tp, fp, histograms.positive.sum(axis=1) - tp, histograms.negative.sum(axis=1) - fp)


def confusion_scores(confusion: Confusion, weights: np.ndarray) -> dict[str, np.ndarray]:
    """THRESHOLD_METRICS of the counts summed over the images with `weights` (..., n)."""
    values = confusion.pooled(weights)
    tp, fp, fn, tn = (
        weights @ count.astype(float) for count in (confusion.tp, confusion.fp, confusion.fn, confusion.tn)
    )
    values["mcc"] = ratio(tp * tn - fp * fn, np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    values["miou"] = (values["iou"] + ratio(tn, tn + fp + fn)) / 2
    values["mdice"] = (values["f1"] + ratio(2 * tn, 2 * tn + fp + fn)) / 2
    return {key: values[key] for key in THRESHOLD_METRICS}


def statistic(confusion: Confusion, histograms: Histograms | None, averaging: str) -> stats.Statistic:
    """The metrics of images weighted by `weights` (..., n): of their summed counts (pooled), or the weighted mean
    of each image's own (mean_per_image); the AUC from `histograms` (none without)."""
    n = len(confusion.tp)
    per_image = None
    if averaging == "mean_per_image":
        per_image = confusion_scores(confusion, np.eye(n))
        if histograms is not None:
            per_image["auc"] = histograms.pooled(np.eye(n))["auc"]

    def metrics(weights: np.ndarray) -> dict[str, np.ndarray]:
        weights = np.asarray(weights, dtype=float)
        if per_image is not None:
            return {key: ratio(weights @ value, weights.sum(axis=-1)) for key, value in per_image.items()}
        values = confusion_scores(confusion, weights)
        if histograms is not None:
            values.update(histograms.pooled(weights))
        return values

    return metrics


@dataclass(frozen=True)
class Scored:
    """One metric of a protocol: its value and 95% bootstrap interval over images (None without resamples)."""

    value: float
    ci: tuple[float, float] | None


def score(
    confusion: Confusion, histograms: Histograms | None, averaging: str, resamples: int, seed: int
) -> dict[str, Scored]:
    """Every metric of `statistic` over all images, with its bootstrap interval over images."""
    metrics = statistic(confusion, histograms, averaging)
    n = len(confusion.tp)
    observed = metrics(np.ones(n))
    cis = stats.bootstrap_intervals(metrics, n, resamples, seed) if resamples > 0 else {}
    return {key: Scored(float(value), cis.get(key)) for key, value in observed.items()}


def best_f1_index(histograms: Histograms, averaging: str) -> int:
    """The bin edge that maximises F1 of these images (pooled, or their mean per image)."""
    tp, fp = from_bin(histograms.positive).astype(float), from_bin(histograms.negative).astype(float)
    positives = histograms.positive.sum(axis=1, keepdims=True)
    if averaging == "pooled":
        tp, fp, positives = tp.sum(axis=0), fp.sum(axis=0), positives.sum()
    f1 = ratio(2 * tp, tp + fp + positives)  # 2tp / (2tp + fp + fn), fn = positives - tp
    if averaging == "mean_per_image":
        f1 = f1.mean(axis=0)
    candidates = f1[1:]  # bin 0's edge (probability 0) calls every pixel vessel
    return 1 + int(np.argmax(candidates))
