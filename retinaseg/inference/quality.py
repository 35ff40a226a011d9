"""Whether a photograph's vessel map can be trusted: how the photograph compares with the model's training images.

A model learns its training photographs' brightness, contrast and vessel widths in pixels. `References` records
their ranges (computed by `references` from the training images when a model is packaged, never typed in);
`assess` measures a photograph the same way and names, in words, each value outside them.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from retinaseg.data.augment import AFFINE_SCALE
from retinaseg.data.preprocess import estimate_fov
from retinaseg.data.sample import Sample
from retinaseg.inference.predictor import Predictor

# The checked values and the decimals they are written with (in predictions.csv, warnings and logs).
DECIMALS = {"brightness": 1, "contrast": 3, "vessel_density": 3, "fov_width": 0}


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    def text(self, decimals: int) -> str:
        return f"{self.low:.{decimals}f}-{self.high:.{decimals}f}"


@dataclass(frozen=True)
class References:
    """What the model's training photographs look like, each as the range (lowest, highest) over them.

    dataset, images: which photographs (dataset name and how many). brightness: mean luminance (0-255) inside the
    FOV. contrast: RMS contrast inside the FOV (standard deviation of luminance over its mean). vessel_density: the
    fraction of FOV pixels the model marks as vessel at its threshold. fov_width: the FOV's width in the pixels the
    model sees (at data.scale), widened by the training augmentation's scale range (AFFINE_SCALE): the vessel widths
    it was trained on.
    """

    dataset: str
    images: int
    brightness: Range
    contrast: Range
    vessel_density: Range
    fov_width: Range

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, values: dict) -> "References":
        ranges = {key: Range(**values[key]) for key in ("brightness", "contrast", "vessel_density", "fov_width")}
        return cls(values["dataset"], int(values["images"]), **ranges)


def brightness_contrast(image: np.ndarray, fov: np.ndarray) -> tuple[float, float]:
    """(brightness, contrast) of an (H, W, 3) uint8 RGB photograph inside its FOV (see References)."""
    luminance = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[fov].astype(np.float64)
    mean = float(luminance.mean())
    return mean, float(luminance.std() / mean) if mean > 0 else 0.0


def fov_width(fov: np.ndarray) -> int:
    """The FOV's width in pixels (columns holding any of it): its diameter, also where a camera cuts its top and
    bottom off."""
    return int(np.count_nonzero(fov.any(axis=0)))


def references(predictor: Predictor, samples: Sequence[Sample], dataset: str) -> References:
    """The References of `samples` (the model's training photographs) by `predictor` (its model, preprocessing and
    threshold).

    Each photograph is measured as predict measures one by default: inside its estimated FOV (a given mask's rim
    differs by a few pixels, which moves the contrast by up to ~0.02 on DRIVE).
    """
    values = {"brightness": [], "contrast": [], "vessel_density": [], "fov_width": []}
    for s in samples:
        fov = estimate_fov(s.image)
        prob = predictor.photograph(s.image, s.id)
        brightness, contrast = brightness_contrast(s.image, fov)
        values["brightness"].append(brightness)
        values["contrast"].append(contrast)
        values["vessel_density"].append(float((prob[fov] > predictor.binarisation.threshold).mean()))
        values["fov_width"].append(fov_width(fov) * predictor.preprocessing.scale)
    ranges = {key: Range(min(v), max(v)) for key, v in values.items()}
    seen = ranges["fov_width"]
    ranges["fov_width"] = Range(seen.low * AFFINE_SCALE[0], seen.high * AFFINE_SCALE[1])
    return References(dataset, len(samples), **ranges)


@dataclass
class Quality:
    """One photograph measured against the model's References (None: the model records none).

    fov: "given" or "estimated"; fov_fraction: its share of the image; fov_width: in the model's pixels (at
    `scale`); warnings: each out-of-range value in words.
    """

    fov: str
    fov_fraction: float
    fov_width: float
    scale: float
    brightness: float
    contrast: float
    vessel_density: float
    reference: References | None
    warnings: list[str] = field(default_factory=list)

    def row(self) -> dict:
        """The record as a row of predictions.csv (ranges "unknown" where the model records none)."""
        row = {"fov": self.fov, "fov_fraction": f"{self.fov_fraction:.3f}", "scale": f"{self.scale:g}"}
        for name, decimals in DECIMALS.items():
            row[name] = f"{getattr(self, name):.{decimals}f}"
            row[f"training_{name}"] = getattr(self.reference, name).text(decimals) if self.reference else "unknown"
        return {**row, "warnings": "; ".join(self.warnings)}

    def summary(self) -> str:
        """One log line's worth: the warnings, or what was checked."""
        if self.warnings:
            return f"{len(self.warnings)} warning(s): " + "; ".join(self.warnings)
        measured = (
            f"FOV {self.fov} ({self.fov_fraction:.0%} of the image, {self.fov_width:.0f} px wide at scale "
            f"{self.scale:g}), brightness {self.brightness:.0f}, contrast {self.contrast:.2f}, vessel density "
            f"{self.vessel_density:.3f}"
        )
        if self.reference is None:
            return f"{measured}; not checked: the model records no ranges of its training images (unknown)"
        return f"{measured}: all within the ranges of the model's training photographs"


def assess(
    image: np.ndarray,
    fov: np.ndarray,
    fov_given: bool,
    mask: np.ndarray,
    scale: float,
    reference: References | None,
) -> Quality:
    """The Quality of a photograph (H, W, 3) uint8 whose FOV (given or estimated) and vessel mask are `fov` and
    `mask` (H, W) bool, seen by the model at `scale`."""
    brightness, contrast = brightness_contrast(image, fov)
    quality = Quality(
        fov="given" if fov_given else "estimated",
        fov_fraction=float(fov.mean()),
        fov_width=fov_width(fov) * scale,
        scale=scale,
        brightness=brightness,
        contrast=contrast,
        vessel_density=float(mask[fov].mean()),
        reference=reference,
    )
    if not fov_given and fov.all():
        quality.warnings.append("no field of view stands out from a dark border: the whole image was used as FOV")
    if (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
        quality.warnings.append("the photograph is grayscale, but the model was trained on colour photographs")
    if reference is None:
        return quality
    where = f"the model's {reference.images} training photographs ({reference.dataset})"
    for name in ("brightness", "contrast", "vessel_density"):
        value, limits, decimals = getattr(quality, name), getattr(reference, name), DECIMALS[name]
        if not limits.low <= value <= limits.high:
            side = "below" if value < limits.low else "above"
            quality.warnings.append(
                f"{name.replace('_', ' ')} {value:.{decimals}f} is {side} the range of {where}, {limits.text(decimals)}"
            )
    width = reference.fov_width
    if not width.low <= quality.fov_width <= width.high:
        ratio = quality.fov_width / math.sqrt(width.low * width.high)
        quality.warnings.append(
            f"the FOV is {quality.fov_width:.0f} px wide at scale {scale:g} but {width.text(0)} px in training, so "
            f"vessels look {ratio:.2g}x as wide as the model learned them: pass scale={scale / ratio:.2g}"
        )
    return quality
