"""The one in-memory record every dataset reader produces."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    """One fundus photograph with its vessel label and field-of-view (FOV) mask, at the dataset's own resolution.

    image: (H, W, 3) uint8 RGB. label: (H, W) uint8 in {0, 1}. fov: (H, W) bool.
    fov_given: True when the FOV mask comes with the dataset, False when it was estimated from the photograph.
    second_label: the second human observer's label (same form as label), where the dataset has one.
    """

    id: str
    image: np.ndarray
    label: np.ndarray
    fov: np.ndarray
    fov_given: bool = True
    second_label: np.ndarray | None = None


def fov_source(samples: Sequence[Sample]) -> str:
    """How the FOV masks of `samples` were obtained: "given", "estimated", or "mixed"."""
    given = {s.fov_given for s in samples}
    return "mixed" if len(given) > 1 else "given" if given == {True} else "estimated"
