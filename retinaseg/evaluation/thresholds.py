"""The binarisation chosen on validation images (threshold=val, hysteresis=val, min_size=val, bridge=val of
retinaseg.eval):
the settings whose F1 pooled over those images' FOV pixels is highest."""

import numpy as np
from torchmetrics.functional.classification import binary_precision_recall_curve

from retinaseg.data.sample import Sample
from retinaseg.evaluation.scoring import count_images, fov_pixels
from retinaseg.inference.binarise import Binarisation


def best_f1_threshold(probs: dict[str, np.ndarray], samples: list[Sample]) -> float:
    """The threshold that maximises F1 pooled over the FOV pixels of `samples`."""
    p, t = fov_pixels(probs, samples)
    precision, recall, thresholds = binary_precision_recall_curve(p, t.long())
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    best = int(f1[:-1].argmax())  # the last point (precision 1, recall 0) has no threshold
    # The curve counts prob >= thresholds[best] as vessel, FOVMetrics prob > threshold: a threshold halfway
    # to the next lower probability selects the same pixels both ways.
    below = float(thresholds[best - 1]) if best > 0 else 0.0
    return (float(thresholds[best]) + below) / 2


# What hysteresis=val, min_size=val and bridge=val choose from: lower thresholds as fractions of the threshold (None:
# off), the fewest pixels a component keeps (0: all), and the most a path joining a smaller component may cost (0:
# none joined; a path's cost is about the number of its pixels the model calls unlikely vessel).
HYSTERESIS = (None, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
MIN_SIZES = (0, 10, 20, 30, 50, 75, 100, 150, 200, 300)
BRIDGES = (0, 1, 2, 4, 8)


def best_binarisation(
    probs: dict[str, np.ndarray], samples: list[Sample], threshold: float, hysteresis, min_size, bridge=0.0
) -> Binarisation:
    """The binarisation at `threshold` whose F1 pooled over the FOV pixels of `samples` is highest (as
    best_f1_threshold's), hysteresis, min_size and bridge each fixed or, where "val", chosen from the candidates
    above (together where several are; a bridge with no min_size joins nothing and is not a candidate); of equal F1,
    the first candidate (the least change)."""
    lows = HYSTERESIS if hysteresis == "val" else [hysteresis]
    sizes = MIN_SIZES if min_size == "val" else [min_size]
    bridges = BRIDGES if bridge == "val" else [bridge]
    ids, fovs = [s.id for s in samples], [s.fov for s in samples]
    labels, maps = [s.label for s in samples], [probs[s.id] for s in samples]

    def f1(settings: Binarisation) -> float:
        return count_images(ids, maps, labels, fovs, settings, with_histograms=False).total()["f1"]

    candidates = [
        Binarisation.checked(threshold, low, size, cost)
        for low in lows
        for size in sizes
        for cost in bridges
        if size or not cost
    ]
    return max(candidates, key=f1)  # max keeps the first of equal values
