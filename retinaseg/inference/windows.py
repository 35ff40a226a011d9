"""Whole-image and sliding-window inference, usable outside the training loop."""

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from retinaseg.inference.settings import WEIGHTINGS, InferenceSettings


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis; the last one is flush with the border so all pixels are covered."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _weight_map(window: tuple[int, int], weighting: str, sigma_scale: float, device: torch.device) -> torch.Tensor:
    """Per-pixel weight of a window's output: uniform, or a Gaussian that trusts window centres over window edges."""
    if weighting == "constant":
        return torch.ones(window, dtype=torch.float32, device=device)
    axes = []
    for size in window:
        coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
        axes.append(torch.exp(-0.5 * (coords / (sigma_scale * size)) ** 2))
    weights = torch.outer(axes[0], axes[1])
    weights /= weights.max()
    # Far from the centre the Gaussian underflows towards 0; a floor (as in MONAI) keeps every pixel's total weight > 0.
    return weights.clamp_(min=1e-3)


def sliding_window_inference(
    images: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    window: int | tuple[int, int],
    overlap: float = 0.25,
    batch_size: int = 16,
    weighting: str = "constant",
    sigma_scale: float = 0.125,
) -> torch.Tensor:
    """Run `predictor` on overlapping windows of `images` (N, C, H, W) and blend them into (N, K, H, W) float32.

    Neighbouring windows share `overlap` of their size; each output pixel is the `weighting`-weighted mean of the
    window outputs covering it. Windows from all images are batched together, `batch_size` per predictor call.
    Gradient tracking is left to the caller (wrap in torch.no_grad / inference_mode for plain inference).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}")
    window = (window, window) if isinstance(window, int) else tuple(window)
    if len(window) != 2 or any(w < 1 for w in window):
        raise ValueError(f"window must be an int or a pair of ints, each >= 1, got {window}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "gaussian" and sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")

    num_images, _, height, width = images.shape
    win_h, win_w = window
    # An image smaller than the window is zero-padded (centred, as MONAI does) so that one window fits; cropped back below.
    pad_h, pad_w = max(win_h - height, 0), max(win_w - width, 0)
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:
        images = F.pad(images, (left, pad_w - left, top, pad_h - top))
    padded_h, padded_w = images.shape[-2:]

    ys = _window_starts(padded_h, win_h, max(1, round(win_h * (1 - overlap))))
    xs = _window_starts(padded_w, win_w, max(1, round(win_w * (1 - overlap))))
    windows = [(n, y, x) for n in range(num_images) for y in ys for x in xs]

    weights = _weight_map(window, weighting, sigma_scale, images.device)
    # Every image has the same window layout, so one (H, W) map of summed weights serves them all.
    weight_sum = torch.zeros(padded_h, padded_w, dtype=torch.float32, device=images.device)
    for y in ys:
        for x in xs:
            weight_sum[y : y + win_h, x : x + win_w] += weights

    output = None
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        crops = torch.stack([images[n, :, y : y + win_h, x : x + win_w] for n, y, x in batch])
        predictions = predictor(crops)
        if predictions.ndim != 4 or predictions.shape[0] != len(batch) or predictions.shape[-2:] != window:
            raise ValueError(
                f"predictor must map {tuple(crops.shape)} to (B, K, {win_h}, {win_w}), got {tuple(predictions.shape)}"
            )
        # Accumulate in float32 on the images' device whatever precision/device the predictor works in.
        predictions = predictions.to(device=images.device, dtype=torch.float32) * weights
        if output is None:
            output = torch.zeros(
                num_images, predictions.shape[1], padded_h, padded_w, dtype=torch.float32, device=images.device
            )
        for (n, y, x), prediction in zip(batch, predictions):
            output[n, :, y : y + win_h, x : x + win_w] += prediction

    output /= weight_sum
    return output[..., top : top + height, left : left + width]


def predict_probabilities(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    settings: InferenceSettings | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sigmoid probabilities (N, 1, H, W) float32 of `model` (a module, or a `Runtime` of one) on `images` (N, C, H, W).

    mode "whole" feeds whole images, `batch_size` at a time (the model pads to its own multiple and crops back);
    mode "sliding" blends the probabilities of overlapping windows via `sliding_window_inference`.
    `settings` None: the defaults. The caller sets train/eval mode; this runs under inference_mode and, if
    `autocast_dtype` is given, autocast.
    """
    settings = settings or InferenceSettings()

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        # Sigmoid in float32: under autocast the logits may be bf16/fp16.
        return model(x).float().sigmoid()

    autocast = (
        contextlib.nullcontext()
        if autocast_dtype is None
        else torch.autocast(device_type=images.device.type, dtype=autocast_dtype)
    )
    with torch.inference_mode(), autocast:
        if settings.mode == "whole":
            return torch.cat([probabilities(chunk) for chunk in images.split(settings.batch_size)])
        # Blend probabilities rather than logits, so one confident window cannot swamp its neighbours.
        return sliding_window_inference(
            images, probabilities, settings.window, settings.overlap, settings.batch_size, settings.weighting
        )


def flip_averaged(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of `predict` on `images` (N, C, H, W) and on their horizontal,
    vertical and double flips, each output flipped back."""
    flips = ([], [-1], [-2], [-2, -1])
    return sum(predict(images.flip(dims)).flip(dims) for dims in flips) / len(flips)
