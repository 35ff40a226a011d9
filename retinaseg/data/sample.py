"""The one in-memory record every image source produces."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    """One fundus photograph with its vessel label and field-of-view (FOV) mask.

    image: (H, W, 3) uint8 RGB. label: (H, W) uint8 in {0, 1}. fov: (H, W) bool.
    extra: optional further labels by name (e.g. DRIVE's second observer), same form as label.
    """

    id: str
    image: np.ndarray
    label: np.ndarray
    fov: np.ndarray
    extra: dict | None = None
