"""Facts about the machine and the code a run ran on: the CPU's model and flags, the fastest mixed precision the
hardware runs well (for `trainer.precision: ${fastest_precision:}`, the resolver registered by
retinaseg.core.config), the memory free for inference, a device's description and the git commit, as runs report
them."""

import functools
import os
import subprocess
from pathlib import Path

import torch


def cpu_info() -> tuple[str | None, set[str]]:
    """The CPU's model name and feature flags, from Linux's /proc/cpuinfo (None and no flags elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None, set()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last processor's, all alike
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name"), set(fields.get("flags", "").split())


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_info()[1])


def fastest_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    # On CPUs without native bf16 (e.g. AVX2-only), bf16 autocast measured 10-17x slower than float32.
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def compile_gains(device: torch.device) -> bool:
    """Whether `model.compile=auto` compiles the network on `device`: on CUDA GPUs (not measured in this project yet);
    not on CPUs, where drive_cpu's compiled step ran at 0.44x-0.92x of the eager one on a shared 2-core AVX-512
    BF16 CPU and at 0.81x-1.11x on the same CPU idle, before the compile time (docs/speed.md): no dependable gain."""
    return device.type == "cuda"


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the vector extensions that decide its speed and its thread count
    (`AMD EPYC 9R14 (avx2 avx512f avx512_bf16), 2 threads`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = cpu_info()
    vector = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model or torch.backends.cpu.get_cpu_capability()} ({' '.join(vector) or 'no avx2'}), {torch.get_num_threads()} threads"


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout this code runs from, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def run_facts(model: torch.nn.Module, device: torch.device) -> dict:
    """What a run's summary says about the model and machine: parameter count, device, git commit."""
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": device_description(device),
        "git_commit": git_commit(),
    }


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
