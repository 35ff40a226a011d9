"""Vessel topology at the threshold, inside the FOV: clDice from skeletons and the Betti-0 error from connected
components (scikit-image), counted per image so that they pool like the pixel counts of retinaseg.evaluation.counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage.measure import label as label_components
from skimage.morphology import skeletonize

from retinaseg.evaluation.counts import ratio


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
