"""The DRIVE table of metrics, computed only on pixels inside the field of view and pooled over a split."""

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
)

# The keys of metrics.json; sensitivity is recall under the name the DRIVE literature uses.
REPORTED = ("f1", "auc", "accuracy", "sensitivity", "specificity", "precision", "recall", "iou")


class FOVMetrics(MetricCollection):
    """recall, precision, f1, accuracy, specificity, iou at `threshold`, and threshold-free auc.

    `update(probs, target, fov)` keeps only pixels where `fov` is true, so every number is pooled over
    all FOV pixels seen since the last reset (not a mean of per-batch values). With `with_auc=False` no
    probabilities are stored, which keeps per-step training metrics cheap.
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
            metrics["auc"] = BinaryAUROC()
        super().__init__(metrics, prefix=prefix)

    def update(self, probs: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None = None) -> None:
        if fov is None:
            fov = torch.ones_like(target, dtype=torch.bool)
        fov = fov.bool()
        super().update(probs.float()[fov], target[fov].long())


def reported(values: dict[str, torch.Tensor | float], prefix: str = "") -> dict[str, float]:
    """Metric values (keys with `prefix`) as the plain floats of metrics.json, with sensitivity added."""
    out = {key: float(values[prefix + key]) for key in REPORTED if key != "sensitivity"}
    out["sensitivity"] = out["recall"]
    return {key: out[key] for key in REPORTED}
