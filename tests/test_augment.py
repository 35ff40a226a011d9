"""The batched training augmentation: its geometry is the one each patch draws, and labels move with the image."""

import numpy as np
import pytest
import torch

from retinaseg.data.augment import (
    AFFINE_SCALE,
    Augmentation,
    augment_batch,
    augmentation_tensors,
    context_size,
    rotation,
)


def crop_batch(n: int, crop: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, crop, crop, generator=generator)
    labels = (torch.rand(n, 1, crop, crop, generator=generator) > 0.8).float()
    fovs = (torch.rand(n, 1, crop, crop, generator=generator) > 0.1).float()
    return images, labels, fovs


def test_the_context_leaves_an_even_margin():
    for patch_size in (16, 33, 48, 64, 65, 96):
        assert (context_size(patch_size) - patch_size) % 2 == 0 and context_size(patch_size) >= 1.5 * patch_size


@pytest.mark.parametrize(
    ("forward", "expected"),
    [
        (np.eye(2), lambda x: x),
        (np.diag([-1.0, 1.0]), lambda x: torch.flip(x, dims=[-1])),
        (np.diag([1.0, -1.0]), lambda x: torch.flip(x, dims=[-2])),
        (rotation(180), lambda x: torch.flip(x, dims=[-2, -1])),
        (rotation(90), lambda x: torch.rot90(x, k=-1, dims=(-2, -1))),
        (rotation(270), lambda x: torch.rot90(x, k=1, dims=(-2, -1))),
    ],
)
def test_flips_and_quarter_turns_move_whole_pixels(forward, expected):
    patch_size, crop = 16, context_size(16)
    images, labels, fovs = crop_batch(2, crop)
    augmentations = [Augmentation(np.linalg.inv(forward))] * 2
    out_images, out_labels, out_fovs = augment_batch(
        images, labels, fovs, patch_size, *augmentation_tensors(augmentations)
    )
    margin = (crop - patch_size) // 2
    centre = (..., slice(margin, margin + patch_size), slice(margin, margin + patch_size))
    assert torch.allclose(out_images, expected(images[centre]), atol=1e-5)
    assert torch.equal(out_labels, expected(labels[centre])) and torch.equal(out_fovs, expected(fovs[centre]))


def test_without_augmentations_the_centre_is_cut():
    images, labels, fovs = crop_batch(3, 16)
    out = augment_batch(images, labels, fovs, 16)
    assert all(torch.equal(a, b) for a, b in zip(out, (images, labels, fovs), strict=True))


def test_labels_stay_on_their_vessels_under_any_warp():
    # The image is its label drawn in every channel: after any warp, a pixel is bright where the label is a vessel,
    # except along edges, where the image is interpolated and the label nearest.
    patch_size, crop = 32, context_size(32)
    rng = np.random.default_rng(0)
    labels = torch.zeros(20, 1, crop, crop)
    for k in range(20):
        row, col = rng.integers(10, crop - 10, size=2)
        labels[k, 0, row - 6 : row + 6, :] = 1  # a horizontal vessel
        labels[k, 0, :, col - 4 : col + 4] = 1  # crossing a vertical one
    augmentations = [Augmentation.draw(np.random.default_rng([7, k])) for k in range(20)]
    # Photometric change off, so the bright level stays 1.
    augmentations = [Augmentation(a.warp) for a in augmentations]
    images, out_labels, _ = augment_batch(
        labels.repeat(1, 3, 1, 1), labels, labels.clone(), patch_size, *augmentation_tensors(augmentations)
    )
    agreement = ((images[:, :1] > 0.5) == (out_labels > 0.5)).float().mean()
    assert agreement > 0.98
    assert not all(np.allclose(a.warp, np.eye(2)) for a in augmentations)


def test_photometric_change_is_contrast_brightness_then_gamma():
    images = torch.full((1, 3, 20, 20), 0.5)
    augmentation = Augmentation(np.eye(2), brightness=0.1, contrast=1.2, gamma=0.8)
    out, _, _ = augment_batch(
        images, torch.zeros(1, 1, 20, 20), torch.ones(1, 1, 20, 20), 12, *augmentation_tensors([augmentation])
    )
    assert torch.allclose(out, torch.full_like(out, (0.5 * 1.2 + 0.1) ** 0.8))
    # Clipped to [0, 1] before the gamma.
    bright = Augmentation(np.eye(2), brightness=0.2, contrast=1.2)
    out, _, _ = augment_batch(
        torch.ones(1, 3, 20, 20),
        torch.zeros(1, 1, 20, 20),
        torch.ones(1, 1, 20, 20),
        12,
        *augmentation_tensors([bright]),
    )
    assert torch.equal(out, torch.ones_like(out))


def test_drawn_augmentations_cover_their_ranges():
    drawn = [Augmentation.draw(np.random.default_rng([1, k])) for k in range(2000)]
    assert np.array_equal(Augmentation.draw(np.random.default_rng([1, 5])).warp, drawn[5].warp)
    # The zoom of the forward warp (the square root of its area change) stays inside AFFINE_SCALE; half are warped.
    zoom = np.array([1 / np.sqrt(abs(np.linalg.det(a.warp))) for a in drawn])
    assert AFFINE_SCALE[0] - 0.01 < zoom.min() and zoom.max() < AFFINE_SCALE[1] + 0.01
    assert 0.4 < np.mean(~np.isclose(zoom, 1)) < 0.6
    # Each flip and photometric change applies to about half the patches; the turns are spread evenly.
    assert 0.4 < np.mean([a.gamma != 1 for a in drawn]) < 0.6
    assert 0.4 < np.mean([a.contrast != 1 for a in drawn]) < 0.6
    plain = [a.warp for a in drawn if np.allclose(np.abs(a.warp), np.round(np.abs(a.warp)))]
    assert len({tuple(np.round(w).ravel()) for w in plain}) == 8  # the dihedral group of the square
