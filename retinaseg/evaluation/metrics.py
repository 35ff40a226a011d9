"""The DRIVE table of metrics, computed only on pixels inside the field of view and pooled over a split.

`FOVMetrics` (torchmetrics) scores training's validation and test batches. Evaluation keeps, per image, the
counts every pooled metric follows from (`ImageCounts`): pixel confusion at the threshold, vessel topology
(clDice, Betti-0) and class-conditional histograms of the probabilities (AUC). Any set of images, each counted
any number of times, is then scored from them without the model: what the bootstrap of retinaseg.evaluation.stats does.
docs/evaluation.md, "Metrics and statistics", gives each formula and its reference.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from skimage.measure import label as label_components
from skimage.morphology import skeletonize
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
)
from torchmetrics.functional.classification import binary_auroc

from retinaseg.evaluation import stats
from retinaseg.inference.binarise import Binarisation, as_binarisation, binarise

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


class FOVMetrics(MetricCollection):
    """recall, precision, f1, accuracy, specificity, iou at `threshold`, and threshold-free auc.

    `update(probs, target, fov)` keeps only pixels where `fov` is true, so every number is pooled over
    all FOV pixels seen since the last reset (not a mean of per-batch values). The AUC is the histograms'
    (HistogramAUROC), so its memory does not grow with the pixels scored; `with_auc=False` leaves it out, which
    keeps per-step training metrics cheap.
    """

    def __init__(self, threshold: float = 0.5, with_auc: bool = True, prefix: str | None = None):
        metrics = {
            "recall": BinaryRecall(threshold),
            "precision": BinaryPrecision(threshold),
            "f1": BinaryF1Score(threshold),
            "accuracy": BinaryAccuracy(threshold),
            "specificity": BinarySpecificity(threshold),
            "iou": BinaryJaccardIndex(threshold),
        }
        if with_auc:
            metrics["auc"] = HistogramAUROC()
        # No compute groups: `update` feeds each metric itself (masks to some, probabilities to the AUC), which
        # state shared within a group would count twice.
        super().__init__(metrics, prefix=prefix, compute_groups=False)

    def update(
        self,
        probs: torch.Tensor,
        target: torch.Tensor,
        fov: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> None:
        """`masks`: the binarised vessel masks (retinaseg.inference.binarise) that the threshold metrics score instead of
        probs > threshold; the AUC always scores the probabilities."""
        if fov is None:
            fov = torch.ones_like(target, dtype=torch.bool)
        fov = fov.bool()
        probs, target = probs.float()[fov], target[fov].long()
        # A 0/1 mask is above any threshold in [0, 1) exactly where it is 1 (threshold 1 leaves no vessel either way).
        predictions = probs if masks is None else masks[fov].float()
        for name, metric in self.items(keep_base=True, copy_state=False):
            metric.update(probs if name == "auc" else predictions, target)


def reported(values: dict[str, torch.Tensor | float], prefix: str = "") -> dict[str, float]:
    """Metric values (keys with `prefix`) as the plain floats of metrics.json, with sensitivity added."""
    out = {key: float(values[prefix + key]) for key in REPORTED if key != "sensitivity"}
    out["sensitivity"] = out["recall"]
    return {key: out[key] for key in REPORTED}


def exact_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """The exact area under the ROC curve of probabilities against binary labels (ties count one half)."""
    return float(binary_auroc(torch.from_numpy(np.asarray(probs)), torch.from_numpy(np.asarray(labels)).long()))


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


@dataclass(frozen=True)
class Topology:
    """Skeleton and component counts of prediction P and label L, each an array with one entry per image.

    skeleton |S(P)|, skeleton_in_label |S(P) & L|, label_skeleton |S(L)|, label_skeleton_in_prediction |S(L) & P|
    (S: scikit-image's `skeletonize`), components β0(P) and label_components β0(L): 8-connected vessel
    components, so that vessels touching at a corner are one.
    """

    skeleton: np.ndarray
    skeleton_in_label: np.ndarray
    label_skeleton: np.ndarray
    label_skeleton_in_prediction: np.ndarray
    components: np.ndarray
    label_components: np.ndarray

    @classmethod
    def of(cls, predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Topology:
        """The counts of each boolean prediction mask against its boolean label mask (both zero outside the FOV)."""
        rows = []
        for p, t in zip(predictions, labels):
            skeleton, label_skeleton = skeletonize(p), skeletonize(t)
            rows.append(
                (
                    skeleton.sum(),
                    (skeleton & t).sum(),
                    label_skeleton.sum(),
                    (label_skeleton & p).sum(),
                    label_components(p, connectivity=2, return_num=True)[1],
                    label_components(t, connectivity=2, return_num=True)[1],
                )
            )
        return cls(*np.array(rows, dtype=np.int64).reshape(-1, 6).T)

    def pooled(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """clDice and its two halves from skeleton counts summed with `weights` (..., n), like F1 from pixel
        counts; the Betti-0 error |β0(P) - β0(L)| averaged over the images with the same weights."""
        precision = ratio(weights @ self.skeleton_in_label, weights @ self.skeleton)
        sensitivity = ratio(weights @ self.label_skeleton_in_prediction, weights @ self.label_skeleton)
        betti0_error = np.abs(self.components - self.label_components)
        return {
            "cldice": ratio(2 * precision * sensitivity, precision + sensitivity),
            "topology_precision": precision,
            "topology_sensitivity": sensitivity,
            "betti0_error": ratio(weights @ betti0_error, weights.sum(axis=-1)),
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


class HistogramAUROC(Metric):
    """The AUC of the probabilities pooled so far, from their class-conditional histograms in the bins of
    `Histograms` (within 1e-4 of the exact AUC): its memory does not grow with the pixels scored, as exact
    AUCs' does (HRF's 30 test images, scored at 3504x2336, hold 180 million FOV pixels)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("positive", torch.zeros(HISTOGRAM_BINS, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negative", torch.zeros(HISTOGRAM_BINS, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        counted = Histograms.of([probs.detach().float().cpu().numpy()], [target.bool().cpu().numpy()])
        self.positive += torch.from_numpy(counted.positive[0]).to(self.positive.device)
        self.negative += torch.from_numpy(counted.negative[0]).to(self.negative.device)

    def compute(self) -> torch.Tensor:
        histograms = Histograms(self.positive.cpu().numpy()[None], self.negative.cpu().numpy()[None])
        return torch.tensor(float(histograms.pooled(np.ones(1))["auc"]))


@dataclass(frozen=True)
class ImageCounts:
    """What every pooled metric of a set of images follows from, one entry per image in the order of `ids`:
    pixel confusion and topology at the threshold, and the probabilities' histograms (None for a binary mask
    such as the second observer's, which has no ROC curve)."""

    ids: tuple[str, ...]
    confusion: Confusion
    topology: Topology
    histograms: Histograms | None = None

    def pooled(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every headline metric of the images, image i counted weights[..., i] times (weights (..., n)): each
        array of shape weights.shape[:-1]. The AUC is the histograms' (docs/evaluation.md: within 1e-4 of the exact one)."""
        weights = np.asarray(weights, dtype=float)
        values = {**self.confusion.pooled(weights), **self.topology.pooled(weights)}
        if self.histograms is not None:
            values.update(self.histograms.pooled(weights))
        return {key: values[key] for key in HEADLINE if key in values}

    def total(self) -> dict[str, float]:
        """The metrics pooled over all images once."""
        return {key: float(value) for key, value in self.pooled(np.ones(len(self.ids))).items()}

    def per_image(self) -> dict[str, np.ndarray]:
        """The metrics of each image alone."""
        return self.pooled(np.eye(len(self.ids)))

    def columns(self) -> dict[str, np.ndarray]:
        """The per-image counts by name (per_image.csv's columns; `from_columns` reads them back)."""
        return {**dataclasses.asdict(self.confusion), **dataclasses.asdict(self.topology)}

    @classmethod
    def from_columns(
        cls, ids: Sequence[str], columns: dict[str, np.ndarray], histograms: Histograms | None = None
    ) -> ImageCounts:
        def part(kind):
            return kind(**{f.name: np.asarray(columns[f.name], dtype=np.int64) for f in dataclasses.fields(kind)})

        return cls(tuple(ids), part(Confusion), part(Topology), histograms)

    @staticmethod
    def column_names() -> list[str]:
        """The names of `columns()`."""
        return [f.name for kind in (Confusion, Topology) for f in dataclasses.fields(kind)]

    def select(self, indices: Sequence[int]) -> ImageCounts:
        """The images at `indices`, in that order."""
        index = np.asarray(indices, dtype=int)
        histograms = self.histograms
        if histograms is not None:
            histograms = Histograms(histograms.positive[index], histograms.negative[index], histograms.logit_range)
        columns = {key: column[index] for key, column in self.columns().items()}
        return ImageCounts.from_columns([self.ids[i] for i in index], columns, histograms)

    def save(self, file) -> None:
        """The counts (with their histograms) as one .npz, which `load` reads back."""
        arrays = {f"column_{key}": column for key, column in self.columns().items()}
        if self.histograms is not None:
            arrays.update(positive=self.histograms.positive, negative=self.histograms.negative)
            arrays["logit_range"] = np.array(self.histograms.logit_range)
        np.savez_compressed(file, ids=np.array(self.ids), **arrays)

    @classmethod
    def load(cls, path) -> ImageCounts:
        with np.load(path, allow_pickle=False) as saved:
            columns = {key: saved[f"column_{key}"] for key in cls.column_names()}
            histograms = None
            if "positive" in saved:
                histograms = Histograms(saved["positive"], saved["negative"], float(saved["logit_range"]))
            return cls.from_columns(saved["ids"].tolist(), columns, histograms)

    @staticmethod
    def concatenate(first: ImageCounts, second: ImageCounts) -> ImageCounts:
        """The images of `first`, then those of `second`; histograms where both have them (in the same bins)."""
        columns = {key: np.concatenate([first.columns()[key], second.columns()[key]]) for key in first.columns()}
        histograms = None
        if first.histograms is not None and second.histograms is not None:
            if not first.histograms.same_bins(second.histograms):
                raise ValueError("histograms in different bins cannot be pooled")
            histograms = Histograms(
                np.concatenate([first.histograms.positive, second.histograms.positive]),
                np.concatenate([first.histograms.negative, second.histograms.negative]),
                first.histograms.logit_range,
            )
        return ImageCounts.from_columns(first.ids + second.ids, columns, histograms)


def count_images(
    ids: Sequence[str],
    probs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    fovs: Sequence[np.ndarray],
    binarisation: Binarisation | float,
    with_histograms: bool,
) -> ImageCounts:
    """The counts of each image inside its FOV: prediction the binarised mask (retinaseg.inference.binarise; a number: prob >
    that threshold, as FOVMetrics), label non-zero; with the probabilities' histograms unless `with_histograms` is
    false (binary masks)."""
    settings = as_binarisation(binarisation)
    predictions = [binarise(p, fov, settings) for p, fov in zip(probs, fovs)]
    truths = [(t > 0) & fov for t, fov in zip(labels, fovs)]
    confusion = Confusion.of([p[fov] for p, fov in zip(predictions, fovs)], [t[fov] for t, fov in zip(truths, fovs)])
    histograms = None
    if with_histograms:
        histograms = Histograms.of([p[fov] for p, fov in zip(probs, fovs)], [t[fov] for t, fov in zip(truths, fovs)])
    return ImageCounts(tuple(ids), confusion, Topology.of(predictions, truths), histograms)


@dataclass
class Scores:
    """What an evaluation reports: metrics.json's numbers, per_image.csv's rows (and the second observer's), and
    the model's per-image counts (its histograms: histograms.npz)."""

    metrics: dict
    rows: list[dict]
    observer_rows: list[dict] | None
    counts: ImageCounts
    binarisation: Binarisation  # how the probabilities became the masks scored


def score(
    ids: Sequence[str],
    probs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    fovs: Sequence[np.ndarray],
    binarisation: Binarisation | float,
    second_observer: Sequence[np.ndarray] | None,
    resamples: int,
    seed: int,
) -> Scores:
    """The metrics of probability maps against labels inside the FOVs, pooled over the images, with bootstrap
    intervals (`resamples` of them, seeded; none for 0), their mean per image and over whole images; the second
    observer's binary masks the same way, and compared with the model on the same images."""
    counts = count_images(ids, probs, labels, fovs, binarisation, with_histograms=True)
    # The reported AUC is the exact one; the histograms' (within 1e-4 of it) serves the intervals.
    per_image = {**counts.per_image(), "auc": np.array([exact_auc(p[f], t[f]) for p, t, f in zip(probs, labels, fovs)])}
    fov_probs, fov_labels = (np.concatenate([x[f] for x, f in zip(xs, fovs)]) for xs in (probs, labels))
    all_probs, all_labels = (np.concatenate([x.ravel() for x in xs]) for xs in (probs, labels))
    metrics = {
        **counts.total(),
        "auc": exact_auc(fov_probs, fov_labels),
        **bootstrap_ci95(counts, resamples, seed),
        "per_image_mean": {key: float(np.mean(per_image[key])) for key in HEADLINE},
        "whole_image": {**whole_image(probs, labels, binarisation), "auc": exact_auc(all_probs, all_labels)},
    }
    observer_rows = None
    if second_observer is not None:
        # A binary mask has no ROC curve, so the observer gets no AUC.
        observer = count_images(ids, second_observer, labels, fovs, 0.5, with_histograms=False)
        metrics["second_observer"] = {
            **observer.total(),
            **bootstrap_ci95(observer, resamples, seed),
            "whole_image": whole_image(second_observer, labels, 0.5),
        }
        # The same images both ways: whether the model is within or beyond human agreement, with a stated confidence.
        both = ImageCounts.concatenate(observer, counts)
        comparison = stats.paired_comparison(both.pooled, len(ids), resamples, seed)
        metrics["model_minus_second_observer"] = {key: value.to_json() for key, value in comparison.items()}
        observer_rows = per_image_rows(observer, observer.per_image())
    return Scores(metrics, per_image_rows(counts, per_image), observer_rows, counts, as_binarisation(binarisation))


def bootstrap_ci95(counts: ImageCounts, resamples: int, seed: int) -> dict:
    """{"ci95": {metric: [low, high]}}; nothing for resamples=0."""
    if resamples == 0:
        return {}
    cis = stats.bootstrap_intervals(counts.pooled, len(counts.ids), resamples, seed)
    return {"ci95": {key: list(ci) for key, ci in cis.items()}}


def whole_image(
    masks: Sequence[np.ndarray], labels: Sequence[np.ndarray], binarisation: Binarisation | float
) -> dict[str, float]:
    """The threshold metrics over all pixels, FOV or not (as some papers count), binarised over the whole image."""
    settings = as_binarisation(binarisation)
    predictions = [binarise(m, np.ones(m.shape, bool), settings) for m in masks]
    pooled = Confusion.of(predictions, [t > 0 for t in labels]).pooled(np.ones(len(masks)))
    return {key: float(value) for key, value in pooled.items()}


def per_image_rows(counts: ImageCounts, per_image: dict[str, np.ndarray]) -> list[dict]:
    """per_image.csv's rows: id, each metric of the image alone, then the counts they come from."""
    columns = counts.columns()
    return [
        {
            "id": image,
            **{key: float(per_image[key][n]) for key in HEADLINE if key in per_image},
            **{key: int(column[n]) for key, column in columns.items()},
        }
        for n, image in enumerate(counts.ids)
    ]
