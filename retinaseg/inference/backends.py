"""Backends a model runs on for inference: torch itself, or OpenVINO's CPU runtime (faster on x86 CPUs)."""

import contextlib
import ctypes
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from retinaseg.core.errors import ConfigError, check_choice
from retinaseg.core.machine import cpu_has_bf16

log = logging.getLogger(__name__)

BACKENDS = ("torch", "openvino", "auto")
PRECISIONS = ("fp32", "bf16")
# `backend="auto"` times both backends on an input of this size (one warm-up, then the faster of two runs).
AUTO_TIMING_SIZE = 256


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
