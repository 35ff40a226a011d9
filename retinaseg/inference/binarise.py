"""Probability map -> vessel mask: the one binarisation of eval, predict, training's validation and test, and
export's settings.

A pixel is vessel where its probability is above `threshold`; three options keep the vessel tree connected
(docs/evaluation.md, "Binarisation"):
- hysteresis: pixels above a lower threshold, `hysteresis` x `threshold`, are vessel too where they connect
  (8-connected) to a pixel above `threshold`, as skimage.filters.apply_hysteresis_threshold does 4-connected
  (FR-UNet's "dual-threshold iteration"). A fraction of the threshold, so that it holds for any threshold
  (threshold=val included);
- bridge: before they are dropped, components of fewer than `min_size` pixels are joined to the larger ones
  (the tree) along the cheapest path, where a pixel costs 1 - its probability and the path's cost is at most
  `bridge` (skimage.graph.MCP_Geometric); the path's pixels become vessel. A broken faint vessel is kept and
  connected, an isolated speck still dropped;
- min_size: 8-connected vessel components of fewer than `min_size` pixels are dropped.
8-connected, as the Betti-0 count of retinaseg.evaluation.topology: vessels touching at a corner are one.
"""

import math
from dataclasses import dataclass

import numpy as np

from retinaseg.core.errors import ConfigError, check_int, check_number


@dataclass(frozen=True)
class Binarisation:
    """threshold: a probability above it is vessel; hysteresis: the lower threshold of connected pixels as a
    fraction of `threshold` (None: off); min_size: the fewest pixels a vessel component keeps (0: all kept);
    bridge: the most a path joining a smaller component to a larger one may cost (0: none joined)."""

    threshold: float = 0.5
    hysteresis: float | None = None
    min_size: int = 0
    bridge: float = 0.0

    @classmethod
    def checked(
        cls, threshold: float, hysteresis: float | None, min_size: int, bridge: float = 0.0, prefix: str = ""
    ) -> "Binarisation":
        """The settings, after checking each (named with `prefix`, e.g. `model.`)."""
        check_number(f"{prefix}threshold", threshold, 0, 1)
        check_int(f"{prefix}min_size", min_size, minimum=0)
        if hysteresis is not None:
            check_number(f"{prefix}hysteresis", hysteresis, 0, 1, include_minimum=False)
        check_number(f"{prefix}bridge", bridge, 0)
        if bridge > 0 and min_size == 0:
            raise ConfigError(
                f"{prefix}bridge={bridge:g} joins the components smaller than {prefix}min_size to the larger ones, and "
                f"{prefix}min_size is 0: set {prefix}min_size too (e.g. 50), or {prefix}bridge=0"
            )
        if bridge > 0 and threshold >= 1:
            raise ConfigError(f"{prefix}bridge needs a threshold below 1; got {threshold}")
        return cls(float(threshold), None if hysteresis is None else float(hysteresis), int(min_size), float(bridge))

    @property
    def low_threshold(self) -> float | None:
        """The lower threshold of hysteresis, a probability (None: off)."""
        return None if self.hysteresis is None else self.hysteresis * self.threshold

    @property
    def plain(self) -> bool:
        """Whether the mask is the probability above the threshold alone."""
        return self.hysteresis is None and self.min_size == 0 and self.bridge == 0

    def words(self) -> str:
        """How a plot's title says it: `probability > 0.5, joined down to 0.35, gaps bridged up to cost 4, components
        of >= 50 px`."""
        text = f"probability > {self.threshold:.3g}"
        if self.hysteresis is not None:
            text += f", joined down to {self.low_threshold:.3g}"
        if self.bridge:
            text += f", gaps bridged up to cost {self.bridge:g}"
        return text + (f", components of >= {self.min_size} px" if self.min_size else "")

    def to_json(self) -> dict:
        return {
            "threshold": self.threshold,
            "hysteresis": self.hysteresis,
            "low_threshold": self.low_threshold,
            "min_size": self.min_size,
            "bridge": self.bridge,
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
    if settings.bridge > 0:
        mask = join_small_components(mask, prob, fov, settings)
    if settings.min_size > 0:
        components = label_components(mask, connectivity=2)
        sizes = np.bincount(components.ravel())
        mask &= sizes[components] >= settings.min_size
    return mask


def join_small_components(mask: np.ndarray, prob: np.ndarray, fov: np.ndarray, settings: Binarisation) -> np.ndarray:
    """`mask` with each component of fewer than `settings.min_size` pixels joined to a larger one (the tree) along
    its cheapest path inside `fov`, where that path costs at most `settings.bridge`: a pixel costs 1 - its
    probability and the tree's pixels nothing, summed along the path as MCP_Geometric does (a diagonal step
    weighs sqrt 2). Rounds repeat until one joins nothing, so a chain of fragments joins piece by piece."""
    from scipy.ndimage import maximum_filter, minimum_position
    from skimage.graph import MCP_Geometric
    from skimage.measure import label as label_components

    mask = mask.copy()
    # Pixels off the mask are at most `threshold` likely, so each costs at least 1 - threshold: no path within
    # the budget reaches further than `reach` from the small component it starts from. Searching only there
    # gives the same paths several times faster than the whole image.
    reach = math.ceil(settings.bridge / (1 - settings.threshold)) + 2
    while True:
        components = label_components(mask, connectivity=2)
        sizes = np.bincount(components.ravel())
        large = sizes >= settings.min_size
        large[0] = False  # the background
        tree = large[components]
        small = mask & ~tree
        if not tree.any() or not small.any():
            return mask
        near = maximum_filter(small, size=2 * reach + 1) & fov
        costs = np.where(tree, 0.0, np.where(near, 1.0 - prob, np.inf))
        # One start per large component: its pixels cost nothing, so the search spreads through all of them at 0.
        flat = components.ravel()
        tree_pixels = np.flatnonzero(tree.ravel())
        starts = tree_pixels[np.unique(flat[tree_pixels], return_index=True)[1]]
        search = MCP_Geometric(costs)
        cumulative, _ = search.find_costs(np.column_stack(np.unravel_index(starts, mask.shape)))
        joined = False
        # Each small component's cheapest pixel: where its path to the tree starts.
        for cheapest in minimum_position(cumulative, components, np.unique(components[small])):
            if cumulative[cheapest] <= settings.bridge:
                path = np.array(search.traceback(cheapest))
                mask[path[:, 0], path[:, 1]] = True
                joined = True
        if not joined:
            return mask
