"""`python -m retinaseg.benchmark [overrides]`: training and inference speed, measured in one run.

Training: patches per second of our Lightning training step (VesselSegmentationModule under a Trainer), eager
and compiled (model.compile), channels_last and contiguous, against a plain PyTorch loop written like the original
notebook (no Lightning, no channels_last), on the same model size, patches, batch size and data, at float32 and
at our default precision; the seconds the first steps took beyond the others (the compilation), the share of
the step spent waiting for data, the rate of each step's arithmetic against a large matrix product's at the same
precision on the same device, and the training data's patches per second alone (the loader's on the CPU, and
finishing the batches on the training device). Inference:
seconds per whole DRIVE test image for each inference mode, and for each backend and precision
(retinaseg.inference.backends.on_backend). Prints tables and writes JSON, with the CPU's flags.
"""

import json
import logging
import platform
from dataclasses import asdict
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, check_bool, check_choice, check_int, exit_on_user_error
from retinaseg.core.machine import cpu_info
from retinaseg.core.safe_io import write_text
from retinaseg.inference.settings import MODES, InferenceSettings
from retinaseg.runs.speed import (
    AUTOCAST,
    BACKEND_VARIANTS,
    REPORTED_FLAGS,
    Variant,
    backend_seconds,
    data_seconds,
    inference_seconds,
    lightning_loop,
    matmul_flops_per_s,
    openvino_version,
    plain_loop,
    step_flops,
    table,
)
from retinaseg.tracking.reports import log_benchmark
from retinaseg.tracking.wandb import finishing_wandb_run

config.setup()
log = logging.getLogger(__name__)


def check_settings(cfg: DictConfig) -> None:
    """The benchmark's own settings (model.* and data.* are checked where they are read)."""
    check_int("seed", cfg.seed)
    check_int("steps", cfg.steps, minimum=1)
    check_int("warmup_steps", cfg.warmup_steps, minimum=0)
    check_int("rounds", cfg.rounds, minimum=1)
    check_int("inference_images", cfg.inference_images, minimum=1)
    if Path(cfg.output).expanduser().exists():
        raise ConfigError(f"output={cfg.output} exists and is not overwritten: choose another output=<path>.")
    check_int("data_batches", cfg.data_batches, minimum=0)
    check_int("matmul_size", cfg.matmul_size, minimum=0)
    for name in ("channels_last", "compile"):
        for value in cfg[name]:
            check_bool(f"{name}[]", value)
    for mode in cfg.inference_modes:
        check_choice("inference_modes[]", mode, MODES)
    if not cfg.precisions and cfg.inference_modes:
        raise ConfigError(
            "precisions must name at least one precision (inference_modes run at the last one), e.g. [32-true]; "
            "precisions=[] inference_modes=[] measures the backends only"
        )
    for precision in cfg.precisions:
        check_choice("precisions[]", precision, ("32-true", *AUTOCAST))
    for name in cfg.backends:
        check_choice("backends[]", name, BACKEND_VARIANTS)


def benchmark(cfg: DictConfig) -> dict:
    check_settings(cfg)
    L.seed_everything(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    hydra.utils.instantiate(cfg.model, _convert_="all")  # checks model.* before the plain loop uses them unchecked
    datamodule.setup("fit")
    datamodule.setup("test")
    loader = datamodule.train_dataloader()
    precisions = list(dict.fromkeys(cfg.precisions))
    patches = cfg.steps * cfg.data.batch_size
    pixels = patches * cfg.data.patch_size**2

    variants = [Variant("plain", p) for p in precisions] + [
        Variant("lightning", p, layout, compiled)
        for p in precisions
        for layout in dict.fromkeys(cfg.channels_last)
        for compiled in dict.fromkeys(cfg.compile)
    ]
    best: dict[Variant, float] = {}
    first_steps: dict[Variant, float] = {}
    waiting: dict[Variant, float] = {}
    for _ in range(cfg.rounds):
        for variant in variants:
            if variant.loop == "plain":
                seconds = plain_loop(cfg, loader, variant.precision, device)
            else:
                timer = lightning_loop(cfg, datamodule, variant)
                seconds = timer.end - timer.start
                # The first round's warm-up holds the compilation; later rounds reuse the compiled code.
                first_steps[variant] = max(timer.warmup_s, first_steps.get(variant, 0.0))
                if seconds < best.get(variant, float("inf")):
                    waiting[variant] = timer.waiting_s / seconds
            best[variant] = min(seconds, best.get(variant, float("inf")))
    training = [
        {
            "name": variant.name,
            **asdict(variant),
            "seconds": s,
            "patches_per_s": patches / s,
            "pixels_per_s": pixels / s,
            "first_steps_s": first_steps.get(variant),
            "waiting_share": waiting.get(variant),
        }
        for variant, s in best.items()
    ]
    baseline = best.get(Variant("plain", "32-true"))
    for row in training:
        row["speedup_vs_plain_fp32"] = baseline / row["seconds"] if baseline else None
        # Against today's default training step: eager, the configured model.channels_last, same precision.
        eager = best.get(Variant("lightning", row["precision"], cfg.model.channels_last, False))
        row["speedup_vs_eager"] = eager / row["seconds"] if eager and row["loop"] == "lightning" else None
    arithmetic = None
    if cfg.matmul_size and training:
        flops = step_flops(cfg)
        matmul = {p: matmul_flops_per_s(cfg.matmul_size, p, device) for p in precisions}
        arithmetic = {
            "step_gflop": flops / 1e9,
            "matmul_size": cfg.matmul_size,
            "matmul_gflop_per_s": {p: rate / 1e9 for p, rate in matmul.items()},
        }
        for row in training:
            row["gflop_per_s"] = flops * cfg.steps / row["seconds"] / 1e9
            row["share_of_matmul"] = row["gflop_per_s"] * 1e9 / matmul[row["precision"]]
    data = None
    if cfg.data_batches:
        data_s = data_seconds(cfg, datamodule, device)
        data = {
            "device": device.type,
            "seconds_per_batch": data_s.total,
            "patches_per_s": cfg.data.batch_size / data_s.total,
            "loader_patches_per_s": cfg.data.batch_size / data_s.loader,
            "finishing_patches_per_s": cfg.data.batch_size / data_s.finishing,
        }
    inference = [
        {
            "mode": mode,
            "precision": precisions[-1],
            "seconds_per_image": inference_seconds(cfg, datamodule, mode, precisions[-1], device),
        }
        for mode in cfg.inference_modes
    ]
    for row in inference:
        row["seconds_for_20_images"] = 20 * row["seconds_per_image"]
    cpu, flags = cpu_info()
    return {
        "machine": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "cpu": cpu or platform.processor() or platform.machine(),
            "cpu_flags": [flag for flag in REPORTED_FLAGS if flag in flags],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **openvino_version(),
        },
        "settings": {
            "base_channels": cfg.model.base_channels,
            "depth": cfg.model.depth,
            "patch_size": cfg.data.patch_size,
            "batch_size": cfg.data.batch_size,
            "steps": cfg.steps,
            "rounds": cfg.rounds,
            "dataset": cfg.data.dataset,
            "inference": InferenceSettings.of(cfg.model.inference, "model.inference").to_json(),
        },
        "training": training,
        "arithmetic": arithmetic,
        "data": data,
        "inference": inference,
        "backends": backend_seconds(cfg, datamodule) if cfg.backends else [],
    }


@hydra.main(version_base="1.3", config_path="conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(), finishing_wandb_run():
        result = benchmark(cfg)
        write_text(cfg.output, json.dumps(result, indent=2) + "\n")
        log_benchmark(config.instantiate_group(cfg.get("logger")), result)
    log.info(
        "benchmark on %s, settings %s\n%s\nwritten to %s",
        result["machine"],
        result["settings"],
        table(result),
        cfg.output,
    )


if __name__ == "__main__":
    main()
