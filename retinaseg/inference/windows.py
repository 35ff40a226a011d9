"""Whole-image and sliding-window inference, usable outside the training loop."""

import contextlib
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from retinaseg.core.errors import ConfigError, check_choice, check_int, check_number
from retinaseg.core.machine import cpu_has_bf16

log = logging.getLogger(__name__)

WEIGHTINGS = ("constant", "gaussian")
MODES = ("whole", "sliding")
BACKENDS = ("torch", "openvino", "auto")
PRECISIONS = ("fp32", "bf16")
# Peak memory of whole-image inference, per pixel of the model's input and per base channel of the U-Net (measured
# on the CPU in fp32: 35-40 bytes at 512x512 to 2048x2048 for base_channels 16 and 64).
BYTES_PER_PIXEL_CHANNEL = 40
# `backend="auto"` times both backends on an input of this size (one warm-up, then the faster of two runs).
AUTO_TIMING_SIZE = 256


def check_inference(settings: dict, prefix: str) -> dict:
    """The inference settings (mode, window, overlap, batch_size, weighting: those given) checked as the
    arguments of `predict_probabilities`, a ConfigError naming `<prefix>.<key>` for a bad one."""
    checks = {
        "mode": lambda name, value: check_choice(name, value, MODES),
        "window": lambda name, value: check_int(name, value, minimum=1),
        "overlap": lambda name, value: check_number(name, value, 0, 1, include_maximum=False),
        "batch_size": lambda name, value: check_int(name, value, minimum=1),
        "weighting": lambda name, value: check_choice(name, value, WEIGHTINGS),
    }
    for key, value in settings.items():
        if key not in checks:
            raise ConfigError(f"{prefix}.{key} is not an inference setting; they are {', '.join(checks)}")
        checks[key](f"{prefix}.{key}", value)
    return settings


def inference_memory(shape: tuple[int, int], base_channels: int, settings: dict) -> int:
    """About the bytes a U-Net of `base_channels` needs to infer on an input of `shape` (H, W) with the inference
    `settings`: its whole image at once, or `batch_size` windows at a time."""
    if settings["mode"] == "whole":
        pixels = shape[0] * shape[1]
    else:
        pixels = min(settings["window"] ** 2, shape[0] * shape[1]) * settings["batch_size"]
    return pixels * base_channels * BYTES_PER_PIXEL_CHANNEL


def available_memory(device: torch.device) -> int:
    """Bytes free for inference on `device`: the GPU's free memory, or the memory Linux says is available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as file:
            fields = dict(line.split(":", 1) for line in file)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
    mode: str = "whole",
    window: int = 256,
    overlap: float = 0.25,
    batch_size: int = 4,
    weighting: str = "gaussian",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sigmoid probabilities (N, 1, H, W) float32 of `model` (a module, or a `Runtime` of one) on `images` (N, C, H, W).

    mode "whole" feeds whole images, `batch_size` at a time (the model pads to its own multiple and crops back);
    mode "sliding" blends the probabilities of overlapping windows via `sliding_window_inference`.
    The caller sets train/eval mode; this runs under inference_mode and, if `autocast_dtype` is given, autocast.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        # Sigmoid in float32: under autocast the logits may be bf16/fp16.
        return model(x).float().sigmoid()

    autocast = (
        contextlib.nullcontext()
        if autocast_dtype is None
        else torch.autocast(device_type=images.device.type, dtype=autocast_dtype)
    )
    with torch.inference_mode(), autocast:
        if mode == "whole":
            return torch.cat([probabilities(chunk) for chunk in images.split(batch_size)])
        # Blend probabilities rather than logits, so one confident window cannot swamp its neighbours.
        return sliding_window_inference(images, probabilities, window, overlap, batch_size, weighting)


def flip_averaged(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of `predict` on `images` (N, C, H, W) and on their horizontal,
    vertical and double flips, each output flipped back."""
    flips = ([], [-1], [-2], [-2, -1])
    return sum(predict(images.flip(dims)).flip(dims) for dims in flips) / len(flips)


@dataclass(frozen=True)
class Runtime:
    """A model ready to run, called like it: `logits = runtime(images)`, (N, C, H, W) -> (N, K, H, W).
    `backend` and `precision` say how it runs (for `backend="auto"`, what was chosen)."""

    backend: str
    precision: str
    logits: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)


def on_backend(model: nn.Module, backend: str = "torch", precision: str = "fp32", channels: int = 3) -> Runtime:
    """`model` (in eval mode, images with `channels` channels -> logits) ready to run on `backend` at `precision`.

    backend "torch" runs the module itself (precision "bf16": under bf16 autocast); "openvino" converts it with
    OpenVINO and compiles it for this CPU (precision "bf16": OpenVINO's bf16 inference precision hint), for
    any batch, height and width; "auto" is OpenVINO where it is installed, the model is on the CPU and it
    runs an input of AUTO_TIMING_SIZE x AUTO_TIMING_SIZE faster than torch on this machine, else torch.
    At "fp32" OpenVINO's probabilities match torch's to ~1e-5; at "bf16" either backend's differ from fp32
    by up to ~0.1 on a few pixels, and bf16 is only fast where the CPU has it natively (AVX512-BF16, AMX).
    """
    check_choice("inference.backend", backend, BACKENDS)
    check_choice("inference.precision", precision, PRECISIONS)
    if model.training:
        raise ValueError("on_backend needs the model in eval mode (model.eval()): it is converted as it is")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if precision == "bf16" and on_cpu and not cpu_has_bf16():
        log.warning("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 inference is emulated and slow here")
    if backend == "torch" or (backend == "auto" and not on_cpu):
        return _torch_runtime(model, precision)
    if not on_cpu:
        raise ConfigError(
            "inference.backend=openvino runs on the CPU: add device=cpu (or use inference.backend=torch)."
        )
    if backend == "auto" and not _openvino_installed():
        log.info("inference.backend=auto: OpenVINO is not installed (pip install -e '.[openvino]'); running on torch")
        return _torch_runtime(model, precision)
    openvino = _openvino_runtime(model, precision, channels)
    if backend == "openvino":
        return openvino
    torch_runtime = _torch_runtime(model, precision)
    sample = torch.zeros(1, channels, AUTO_TIMING_SIZE, AUTO_TIMING_SIZE)
    seconds = {runtime.backend: _fastest_run(runtime, sample) for runtime in (torch_runtime, openvino)}
    chosen = openvino if seconds["openvino"] < seconds["torch"] else torch_runtime
    log.info(
        "inference.backend=auto: %s (a %dx%d input took %.3g s on torch, %.3g s on OpenVINO, %s)",
        chosen.backend,
        AUTO_TIMING_SIZE,
        AUTO_TIMING_SIZE,
        seconds["torch"],
        seconds["openvino"],
        precision,
    )
    return chosen


def _torch_runtime(model: nn.Module, precision: str) -> Runtime:
    if precision == "fp32":
        return Runtime("torch", precision, model)

    def bf16_logits(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return model(images).float()

    return Runtime("torch", precision, bf16_logits)


def _openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino_runtime(model: nn.Module, precision: str, channels: int) -> Runtime:
    if not _openvino_installed():
        raise ConfigError(
            "inference.backend=openvino needs OpenVINO, which is not installed: pip install -e '.[openvino]' "
            "(or use inference.backend=torch)."
        )
    import openvino

    # Traced once on a small example (as convert_model would, but without its check run, which took half of the
    # time); the U-Net has no branch on the input's size, so the trace holds for any batch, height and width.
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, channels, 64, 64), check_trace=False)
    compiled = compiled_for_cpu(openvino.convert_model(traced, input=[(-1, channels, -1, -1)]), precision)

    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(compiled(images.detach().float().contiguous().numpy())[0])

    return Runtime("openvino", precision, logits)


class _SignalStack(ctypes.Structure):
    """Linux's stack_t, as sigaltstack(2) reads and writes it."""

    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


@contextlib.contextmanager
def _signal_stack_kept():
    """Gives the calling thread back its alternate signal stack after what runs inside. OpenVINO's CPU plugin
    points the compiling thread's alternate signal stack at memory of its own and may free that memory later;
    the next signal handled on that stack (a scheduler's SIGTERM to a training in the same process, Python's
    faulthandler) then kills the process with SIGSEGV. Linux only (the structure's layout differs elsewhere)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    sigaltstack = ctypes.CDLL(None, use_errno=True).sigaltstack
    own = _SignalStack()
    sigaltstack(None, ctypes.byref(own))
    try:
        yield
    finally:
        sigaltstack(ctypes.byref(own), None)


def compiled_for_cpu(model, precision: str = "fp32"):
    """An OpenVINO model (converted, or the path of an ONNX or OpenVINO IR file) compiled for this CPU at
    `precision` ("fp32", or "bf16": OpenVINO's bf16 inference precision hint where the CPU has bf16)."""
    import openvino

    # OpenVINO's CPU default is bf16 where the CPU has it: fp32 is asked for explicitly.
    hint = "bf16" if precision == "bf16" and cpu_has_bf16() else "f32"
    with _signal_stack_kept():
        return openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})


def _fastest_run(runtime: Runtime, sample: torch.Tensor) -> float:
    """Seconds of the faster of two runs of `runtime` on `sample`, after one warm-up run."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            runtime(sample)
            times.append(time.perf_counter() - start)
    return min(times[1:])
