"""Training augmentation applied to whole batches as tensors: one affine warp per patch (flips, 90-degree rotations,
a small zoom, rotation and shear) sampled in a single `grid_sample`, then brightness, contrast and gamma jitter.

Each patch's parameters are drawn from the generator of its own index (PatchDataset), so a patch is the same in any
worker and after a resume; only the arithmetic is batched. The loader hands over a PatchBatch (the uint8 crops and the
drawn parameters), and the warps run after the batch's transfer, on the training device: per patch in albumentations
this cost a drive_cpu step about 12% of its time on 2 CPU cores; batched it is a few milliseconds per batch on the
CPU (docs/speed.md), and on a GPU it leaves the loader only cutting the crops and drawing the parameters.
"""

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from retinaseg.data.preprocess import Preprocessing

# The affine warp's zoom range: the vessel widths (in pixels) a model sees in training span this much around the
# training images' own (retinaseg.inference.quality checks a photograph's size against it).
AFFINE_SCALE = (0.9, 1.1)
AFFINE_ROTATION = 20.0  # degrees either way
AFFINE_SHEAR = 5.0  # degrees either way, along each axis
JITTER = 0.2  # brightness and contrast change, either way
GAMMA = (0.8, 1.2)
CHANCE = 0.5  # of each flip, of the affine warp and of each photometric change; the 90-degree turn is always drawn


def context_size(patch_size: int) -> int:
    """The side of the crop a patch is warped from: about 1.5 times the patch, so rotated corners stay inside real
    pixels, with an even margin so that an unwarped patch's pixel centres fall on the crop's (a copy of its pixels,
    to float rounding)."""
    return patch_size + 2 * math.ceil(patch_size / 4)


@dataclass(frozen=True)
class Augmentation:
    """One patch's augmentation: `warp` (2x2) maps the patch's centred coordinates to the crop's (the inverse of the
    flips, turn and affine the patch undergoes), and the photometric change x -> (x * contrast + brightness) ** gamma
    on [0, 1] intensities."""

    warp: np.ndarray
    brightness: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Augmentation":
        """Flips, a turn by 0-3 quarters, the affine warp (zoom, rotation, shear) and the photometric jitter, each
        drawn from `rng` in a fixed order."""
        flip_x, flip_y = (-1.0 if rng.random() < CHANCE else 1.0 for _ in range(2))
        forward = rotation(90.0 * int(rng.integers(4))) @ np.diag([flip_x, flip_y])
        if rng.random() < CHANCE:
            zoom = rng.uniform(*AFFINE_SCALE)
            angle = rng.uniform(-AFFINE_ROTATION, AFFINE_ROTATION)
            shear_x, shear_y = np.tan(np.radians(rng.uniform(-AFFINE_SHEAR, AFFINE_SHEAR, size=2)))
            forward = rotation(angle) @ np.array([[1.0, shear_x], [shear_y, 1.0]]) @ np.diag([zoom, zoom]) @ forward
        brightness, contrast = (rng.uniform(-JITTER, JITTER) if rng.random() < CHANCE else 0.0 for _ in range(2))
        gamma = rng.uniform(*GAMMA) if rng.random() < CHANCE else 1.0
        return cls(np.linalg.inv(forward), brightness, 1.0 + contrast, gamma)


def rotation(degrees: float) -> np.ndarray:
    radians = math.radians(degrees)
    # Rounded so that quarter turns are exact permutations of pixels.
    return np.round([[math.cos(radians), -math.sin(radians)], [math.sin(radians), math.cos(radians)]], 12)


def augmentation_tensors(augmentations: list[Augmentation]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's augmentations as tensors: the warps (N, 2, 2) and the photometric changes (N, 3: contrast,
    brightness, gamma), float32."""
    warps = torch.as_tensor(np.stack([a.warp for a in augmentations]), dtype=torch.float32)
    jitter = torch.tensor([[a.contrast, a.brightness, a.gamma] for a in augmentations], dtype=torch.float32)
    return warps, jitter


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    fovs: torch.Tensor,
    patch_size: int,
    warps: torch.Tensor | None = None,
    jitter: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patches of `patch_size` from the centres of the crops `images` (N, 3, C, C) in [0, 1], `labels` and `fovs`
    (N, 1, C, C), each warped by its `warps` and jittered by its `jitter` (`augmentation_tensors`), on the crops' device: images
    bilinear, labels and FOV masks nearest, borders reflected. Without `warps` the centres are cut as they are."""
    crop = images.shape[-1]
    margin = (crop - patch_size) // 2
    if warps is None:
        window = (..., slice(margin, margin + patch_size), slice(margin, margin + patch_size))
        return images[window], labels[window], fovs[window]
    # affine_grid's coordinates run from -1 to 1 over the crop; the patch covers patch_size / crop of it.
    warps = warps.to(images.dtype) * (patch_size / crop)
    theta = torch.cat([warps, warps.new_zeros(len(warps), 2, 1)], dim=2)
    grid = F.affine_grid(theta, [len(images), 1, patch_size, patch_size], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    masks = torch.cat([labels, fovs], dim=1).to(images.dtype)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    contrast, brightness, gamma = jitter.to(images.dtype)[:, :, None, None, None].unbind(1)
    images = (images * contrast + brightness).clamp_(0, 1).pow_(gamma)
    return images, masks[:, :1], masks[:, 1:]


@dataclass(frozen=True)
class PatchBatch:
    """A batch of training patches as the loader hands it over: the uint8 crops around the patches and each patch's
    drawn augmentation (`augmentation_tensors`; None without augmentation). `finish` turns it into the batch the model trains on,
    on whatever device the tensors are: the LightningModule calls it after Lightning has moved the batch to the
    training device, so that on a GPU the warps run there."""

    images: torch.Tensor  # (N, 3, C, C) uint8
    labels: torch.Tensor  # (N, 1, C, C) uint8
    fovs: torch.Tensor  # (N, 1, C, C) uint8
    warps: torch.Tensor | None
    jitter: torch.Tensor | None
    patch_size: int
    preprocessing: Preprocessing  # whose standardisation follows the jitter

    def to(self, device: torch.device | str) -> "PatchBatch":
        """The batch with its tensors on `device` (how Lightning moves a batch that has a `to`)."""
        moved = {f.name: value.to(device) for f in fields(self) if torch.is_tensor(value := getattr(self, f.name))}
        return replace(self, **moved)

    def finish(self) -> dict[str, torch.Tensor]:
        """The batch the model trains on: "image" (N, 3, P, P) standardised, "label" (N, 1, P, P) float, "fov"
        (N, 1, P, P) bool, each patch warped, cut and jittered (`augment_batch`)."""
        images = self.images.float().div_(255)
        labels, fovs = self.labels.float(), self.fovs.float()
        images, labels, fovs = augment_batch(images, labels, fovs, self.patch_size, self.warps, self.jitter)
        return {"image": self.preprocessing.standardise(images), "label": labels, "fov": fovs.bool()}
