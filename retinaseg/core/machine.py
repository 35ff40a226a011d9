"""Facts of this machine: its CPU's flags, the fastest mixed precision it runs well (`trainer.precision:
${fastest_precision:}`, registered by retinaseg.core.config), whether compiling pays, the memory free for inference."""

import os
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
    BF16 CPU, before the compile time (docs/speed.md)."""
    return device.type == "cuda"


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
