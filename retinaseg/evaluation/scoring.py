"""An evaluation's numbers: each image's counts (`ImageCounts`: pixel confusion and topology at the threshold,
the probabilities' histograms) and what is reported from them (`score`: pooled metrics with bootstrap intervals,
their mean per image, over whole images, and the second observer's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from retinaseg.data.sample import Sample
from retinaseg.evaluation import stats
from retinaseg.evaluation.counts import HEADLINE, Confusion, Histograms
from retinaseg.evaluation.topology import Topology
from retinaseg.inference.binarise import Binarisation, as_binarisation, binarise


def exact_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """The exact area under the ROC curve of probabilities against binary labels (ties count one half)."""
    return float(binary_auroc(torch.from_numpy(np.asarray(probs)), torch.from_numpy(np.asarray(labels)).long()))


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


def fov_pixels(probs: dict[str, np.ndarray], samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities and labels of the FOV pixels of `samples`, pooled."""
    fov_probs = torch.cat([torch.from_numpy(probs[s.id][s.fov]) for s in samples])
    fov_labels = torch.cat([torch.from_numpy(s.label[s.fov]) for s in samples])
    return fov_probs, fov_labels
