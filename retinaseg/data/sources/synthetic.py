"""Procedurally drawn fundus-like photographs with exact vessel and FOV masks (`data=synthetic`).

A stand-in for DRIVE when the real data is absent (tests, smoke runs, demos): each image has a
circular field of view, an optic-disc-like bright spot, a darker fovea, uneven reddish
illumination and a branching vessel tree whose binary label is exactly what was drawn.
Split: `n` training images (synthetic_000, ...) and `n` test images (synthetic_test_000, ...), drawn
from different seeds.
"""

from collections.abc import Iterable, Iterator, Sequence

import cv2
import numpy as np

from retinaseg.data.sample import Sample

_STEP = 4.0  # px between polyline points; short enough that curves look smooth


def _draw_tree(ink: np.ndarray, rng: np.random.Generator, disc: complex, fovea: complex, fov_r: float):
    """Grow vessels from the disc by recursive (stack-based) bifurcation, drawn anti-aliased into ink.

    Points are complex numbers x + iy (one exp gives both coordinates; y points down).
    """
    height, width = ink.shape
    centre = complex((width - 1) / 2, (height - 1) / 2)
    stack = []
    # Per side (superior, inferior): an artery-vein pair of arcades that leave the disc nearly
    # vertically and curve round the fovea, and a smaller nasal trunk. Angles are from the
    # disc-to-fovea direction, mirrored when the fovea lies to the left.
    for up in (-1.0, 1.0):
        for lo, hi, w, k in ((65, 85, 8.0, 0.006), (75, 95, 6.5, 0.005), (110, 160, 5.5, -0.002)):
            a, k = np.deg2rad(rng.uniform(lo, hi)) * up, -up * k * rng.uniform(0.7, 1.2)
            a, k = (a, k) if fovea.real > disc.real else (np.pi - a, -k)
            stack.append((disc, a, k, w * rng.uniform(0.85, 1.05)))
    while stack:
        start, a, k, w = stack.pop()
        n = int((w * rng.uniform(8, 16) + rng.uniform(15, 35)) / _STEP) + 1
        # Heading = constant curvature + a random walk, so segments bend gently, never kink.
        heading = a + np.cumsum(rng.normal(k * _STEP, 0.04, n))
        z = np.empty(n + 1, complex)
        z[0] = start
        z[1:] = start + np.cumsum(np.exp(1j * heading)) * _STEP
        # Stop (without branching) at the FOV edge and short of the avascular fovea.
        inside = (np.abs(z - centre) < fov_r) & (np.abs(z - fovea) > 0.12 * fov_r)
        stop = not inside.all()
        z = z[: int(np.argmin(inside))] if stop else z
        if len(z) < 2:
            continue
        # Integer thickness per segment; the calibre tapers from one segment to the next.
        # shift=4: four fractional bits, so the anti-aliasing is sub-pixel accurate.
        pts = np.rint(z.view(np.float64).reshape(-1, 2) * 16).astype(np.int32)
        cv2.polylines(ink, [pts], False, 255, max(1, round(w)), cv2.LINE_AA, shift=4)
        if stop or w < 1.2:
            continue
        # Asymmetric bifurcation: the main branch keeps most of the calibre and direction.
        side = 1.0 if rng.random() < 0.5 else -1.0
        w_main, w_side = w * rng.uniform(0.75, 0.84), w * rng.uniform(0.45, 0.72)
        stack.append((z[-1], heading[-1] + side * np.deg2rad(rng.uniform(5, 20)), k * 0.5, w_main))
        if w_side >= 0.8:
            a_side = heading[-1] - side * np.deg2rad(rng.uniform(35, 75))
            stack.append((z[-1], a_side, rng.normal(0, 0.004), w_side))


def _gauss(xs: np.ndarray, ys: np.ndarray, centre: complex, sd: float) -> np.ndarray:
    """2-D Gaussian bump, built as an outer product because a full-frame exp is slow."""
    gy = np.exp(-((ys - centre.imag) ** 2) / (2 * sd**2))
    return gy[:, None] * np.exp(-((xs - centre.real) ** 2) / (2 * sd**2))


def _one(index: int, seed: int, height: int, width: int, prefix: str = "synthetic") -> Sample:
    rng = np.random.default_rng([seed, index])  # image i does not depend on how many are made
    centre = complex((width - 1) / 2, (height - 1) / 2)
    fov_r = 0.48 * min(height, width)  # DRIVE-like: the disc nearly fills the frame
    xs = (np.arange(width, dtype=np.float32) - centre.real) / fov_r  # FOV-relative coordinates
    ys = (np.arange(height, dtype=np.float32) - centre.imag) / fov_r
    r2 = ys[:, None] ** 2 + xs[None, :] ** 2
    fov = r2 <= 1.0

    # Optic disc off to one side, fovea near the centre (~2.5 disc diameters away, as in DRIVE).
    side = 1.0 if rng.random() < 0.5 else -1.0
    disc = complex(side * rng.uniform(0.55, 0.7), rng.uniform(-0.1, 0.1))
    fovea = complex(-side * rng.uniform(0.05, 0.15), disc.imag + rng.uniform(-0.02, 0.1))

    ink = np.zeros((height, width), np.uint8)
    _draw_tree(ink, rng, centre + disc * fov_r, centre + fovea * fov_r, fov_r)
    label = ((ink >= 128) & fov).astype(np.uint8)

    # Illumination: vignetting, a linear gradient, low-frequency blotches and a dark fovea.
    gx, gy = rng.uniform(-0.15, 0.15, 2).tolist()  # plain floats keep the maths in float32
    blotch = cv2.resize(rng.normal(0, 0.06, (6, 6)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    light = (1 - 0.35 * r2) * (1 + gy * ys[:, None] + gx * xs[None, :]) + blotch
    light *= 1 - 0.35 * _gauss(xs, ys, fovea, 0.12)
    colour = (rng.uniform(190, 225), rng.uniform(75, 100), rng.uniform(25, 45))
    glow = _gauss(xs, ys, disc, 0.1)  # optic disc: bright, yellowish
    # Vessels absorb most in green; a light blur softens edges as a camera would.
    dark = cv2.GaussianBlur(ink, (3, 3), 0).astype(np.float32) * (rng.uniform(0.8, 1.1) / 255)
    # One noise field shared by the channels (luminance-like) keeps this cheap.
    noise = rng.standard_normal((height, width), dtype=np.float32) * 4.0
    planes = [
        np.clip((light * c + glow * g) * (1 - dark * k) + noise, 0, 255).astype(np.uint8)
        for c, g, k in zip(colour, (50, 110, 70), (0.25, 0.5, 0.35))
    ]
    img = cv2.merge(planes)  # per-plane clipping then merging is much faster than on (H, W, 3)
    img = cv2.bitwise_and(img, img, mask=fov.view(np.uint8))  # black outside the FOV
    return Sample(id=f"{prefix}_{index:03d}", image=img, label=label, fov=fov)


def synthetic_samples(n: int, seed: int = 0, height: int = 584, width: int = 565) -> list[Sample]:
    """n deterministic synthetic fundus samples (same arguments give bit-identical arrays)."""
    return [_one(i, seed, height, width) for i in range(n)]


# Distinct seeds keep the test images apart from the training ones.
TEST_SEED_OFFSET = 1_000_003


class SyntheticCatalogue:
    """The synthetic dataset, read like the others (see retinaseg.data.sources.files.Catalogue)."""

    name = "synthetic"

    def __init__(self, n: int = 20, size: Sequence[int] = (584, 565), seed: int = 0):
        self.n, self.size, self.seed = n, tuple(size), seed

    def ids(self, split: str = "all") -> list[str]:
        train = [f"synthetic_{i:03d}" for i in range(self.n)] if split in ("train", "all") else []
        return train + ([f"synthetic_test_{i:03d}" for i in range(self.n)] if split in ("test", "all") else [])

    def read(self, ids: Iterable[str]) -> Iterator[Sample]:
        for sample_id in ids:
            prefix, index = sample_id.rsplit("_", 1)
            seed = self.seed + (TEST_SEED_OFFSET if prefix == "synthetic_test" else 0)
            yield _one(int(index), seed, *self.size, prefix=prefix)
