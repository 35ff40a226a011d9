"""Probability map -> vessel mask: the one binarisation of eval, predict, training's validation and test, and
export's settings.

A pixel is vessel where its probability is above `threshold`; two options keep the vessel tree connected
(docs/evaluation.md, "Binarisation"):
- hysteresis: pixels above a lower threshold, `hysteresis` x `threshold`, are vessel too where they connect
  (8-connected) to a pixel above `threshold`, as skimage.filters.apply_hysteresis_threshold does 4-connected
  (FR-UNet's "dual-threshold iteration"). A fraction of the threshold, so that it holds for any threshold
  (threshold=val included);
- min_size: 8-connected vessel components of fewer than `min_size` pixels are dropped.
8-connected, as the Betti-0 count of retinaseg.evaluation.topology: vessels touching at a corner are one.
"""

from dataclasses import dataclass

import numpy as np

from retinaseg.core.errors import check_int, check_number


@dataclass(frozen=True)
class Binarisation:
    """threshold: a probability above it is vessel; hysteresis: the lower threshold of connected pixels as a
    fraction of `threshold` (None: off); min_size: the fewest pixels a vessel component keeps (0: all kept)."""

    threshold: float = 0.5
    hysteresis: float | None = None
    min_size: int = 0

    @classmethod
    def checked(cls, threshold: float, hysteresis: float | None, min_size: int, prefix: str = "") -> "Binarisation":
        """The settings, after checking each (named with `prefix`, e.g. `model.`)."""
        check_number(f"{prefix}threshold", threshold, 0, 1)
        check_int(f"{prefix}min_size", min_size, minimum=0)
        if hysteresis is not None:
            check_number(f"{prefix}hysteresis", hysteresis, 0, 1, include_minimum=False)
        return cls(float(threshold), None if hysteresis is None else float(hysteresis), int(min_size))

    @property
    def low_threshold(self) -> float | None:
        """The lower threshold of hysteresis, a probability (None: off)."""
        return None if self.hysteresis is None else self.hysteresis * self.threshold

    @property
    def plain(self) -> bool:
        """Whether the mask is the probability above the threshold alone."""
        return self.hysteresis is None and self.min_size == 0

    def words(self) -> str:
        """How a plot's title says it: `probability > 0.5, joined down to 0.35, components of >= 150 px`."""
        text = f"probability > {self.threshold:.3g}"
        if self.hysteresis is not None:
            text += f", joined down to {self.low_threshold:.3g}"
        return text + (f", components of >= {self.min_size} px" if self.min_size else "")

    def to_json(self) -> dict:
        return {
            "threshold": self.threshold,
            "hysteresis": self.hysteresis,
            "low_threshold": self.low_threshold,
            "min_size": self.min_size,
        }


def as_binarisation(binarisation: Binarisation | float) -> Binarisation:
    """The settings, or a plain threshold's."""
    return binarisation if isinstance(binarisation, Binarisation) else Binarisation(float(binarisation))


def binarise(prob: np.ndarray, fov: np.ndarray, settings: Binarisation) -> np.ndarray:
    """The boolean vessel mask (H, W) of a probability map inside the boolean `fov` (False outside)."""
    # Imported here: the LightningModule binarises, and importing it should not load scikit-image.
    from skimage.measure import label as label_components

    mask = (prob > settings.threshold) & fov
    if settings.hysteresis is not None:
        low = (prob > settings.low_threshold) & fov
        components = label_components(low, connectivity=2)
        mask = np.isin(components, np.unique(components[mask])) & low
    if settings.min_size > 0:
        components = label_components(mask, connectivity=2)
        sizes = np.bincount(components.ravel())
        mask &= sizes[components] >= settings.min_size
    return mask
