"""The metrics training logs on its validation and test batches (torchmetrics): the threshold metrics of the
DRIVE table pooled over the FOV pixels seen, and the AUC from histograms in retinaseg.evaluation.counts' bins.
"""

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
)

from retinaseg.evaluation.counts import HISTOGRAM_BINS, REPORTED, Histograms


class FOVMetrics(MetricCollection):
    """recall, precision, f1, accuracy, specificity, iou at `threshold`, and threshold-free auc.

    `update(probs, target, fov)` keeps only pixels where `fov` is true, so every number is pooled over
    all FOV pixels seen since the last reset (not a mean of per-batch values). The AUC is the histograms'
    (HistogramAUROC), so its memory does not grow with the pixels scored; `with_auc=False` leaves it out, which
    keeps per-step training metrics cheap.
    """

    def __init__(self, threshold: float = 0.5, with_auc: bool = True, prefix: str | None = None):
        # `update` hands them probabilities in [0, 1] (or 0/1 masks) and 0/1 targets. torchmetrics' own check of
        # that sorts each batch to find its distinct values: without it the six updates of a drive_cpu training
        # step take about half the time.
        metrics = {
            name: kind(threshold, validate_args=False)
            for name, kind in (
                ("recall", BinaryRecall),
                ("precision", BinaryPrecision),
                ("f1", BinaryF1Score),
                ("accuracy", BinaryAccuracy),
                ("specificity", BinarySpecificity),
                ("iou", BinaryJaccardIndex),
            )
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
