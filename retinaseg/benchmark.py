"""`python -m retinaseg.benchmark [overrides]`: training and inference speed, measured in one run.

Training: patches per second of our Lightning training step (VesselSegmentationModule under a Trainer), eager
and compiled (model.compile), channels_last and contiguous, against a plain PyTorch loop written like the original
notebook (no Lightning, no channels_last), on the same model size, patches, batch size and data, at float32 and
at our default precision; the seconds the first steps took beyond the others (the compilation), the share of
the step spent waiting for data, and the training loader's patches per second alone. Inference:
seconds per whole DRIVE test image for each inference mode, and for each backend and precision
(retinaseg.inference.backends.on_backend). Prints tables and writes JSON, with the CPU's flags.
"""

import copy
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, check_bool, check_choice, check_int, exit_on_user_error
from retinaseg.core.machine import cpu_has_bf16, cpu_info
from retinaseg.core.safe_io import write_text
from retinaseg.inference.backends import on_backend
from retinaseg.inference.binarise import Binarisation
from retinaseg.inference.predictor import Predictor
from retinaseg.inference.settings import MODES, InferenceSettings
from retinaseg.model.losses import SegmentationLoss
from retinaseg.model.unet import UNet
from retinaseg.runs.budget import StepTimer, timing_trainer
from retinaseg.tracking.reports import log_benchmark
from retinaseg.tracking.wandb import finishing_wandb_run

config.setup()
log = logging.getLogger(__name__)

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# Whole-image inference variants: (backend, precision, channels_last) by name (conf/benchmark.yaml `backends`).
BACKEND_VARIANTS = {
    "torch-fp32": ("torch", "fp32", False),
    "torch-fp32-channels_last": ("torch", "fp32", True),
    "torch-bf16-channels_last": ("torch", "bf16", True),
    "openvino-fp32": ("openvino", "fp32", False),
    "openvino-bf16": ("openvino", "bf16", False),
}
# CPU features that decide which variant is fast, written into benchmark.json.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _batches(loader, count: int):
    """`count` batches, cycling through the loader as epochs would."""
    epoch, produced = 0, 0
    while produced < count:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
            produced += 1
            if produced == count:
                return
        epoch += 1


def plain_loop(cfg: DictConfig, loader, precision: str, device: torch.device) -> float:
    """Seconds for cfg.steps timed steps of a notebook-style loop: model, Adam, loss, backward, step."""
    torch.manual_seed(cfg.seed)
    model = UNet(cfg.model.in_channels, 1, cfg.model.base_channels, cfg.model.depth).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.model.lr)
    loss_fn = SegmentationLoss(cfg.model.loss, cfg.model.cldice_weight)
    model.train()
    for step, batch in enumerate(_batches(loader, cfg.warmup_steps + cfg.steps)):
        if step == cfg.warmup_steps:
            start = time.perf_counter()
        x, y = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision in AUTOCAST):
            y_pred = model(x)
        loss = loss_fn(y_pred, y)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Variant:
    """One training loop measured: `loop` "plain" (the notebook's) or "lightning" (ours, with the model's
    channels_last and compile settings)."""

    loop: str
    precision: str
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        """`plain`, `lightning`, `lightning-channels_last`, `lightning-compiled`, `lightning-channels_last-compiled`."""
        return "-".join([self.loop] + ["channels_last"] * self.channels_last + ["compiled"] * self.compile)


def lightning_loop(cfg: DictConfig, datamodule, variant: Variant) -> StepTimer:
    """cfg.steps timed steps of our LightningModule under a Trainer, nothing else switched on: its timer."""
    torch.manual_seed(cfg.seed)
    model = hydra.utils.instantiate(
        cfg.model, channels_last=variant.channels_last, compile=variant.compile, _convert_="all"
    )
    timer = StepTimer(cfg.warmup_steps)
    trainer = timing_trainer(timer, cfg.warmup_steps + cfg.steps, precision=variant.precision, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=datamodule.train_dataloader())
    return timer


def data_seconds(cfg: DictConfig, datamodule) -> float:
    """Seconds per batch of the training loader alone (cutting, augmenting and batching patches), over
    cfg.data_batches batches after one."""
    batches = _batches(datamodule.train_dataloader(), cfg.data_batches + 1)
    next(batches)  # the workers' start, where data.num_workers > 0
    start = time.perf_counter()
    for _ in batches:
        pass
    return (time.perf_counter() - start) / cfg.data_batches


def inference_seconds(cfg: DictConfig, datamodule, mode: str, precision: str, device: torch.device) -> float:
    """Mean seconds per whole test image (batch of one) with the given inference mode, after one warmup image."""
    model = hydra.utils.instantiate(cfg.model, _convert_="all").to(device).eval()
    predictor = model.predictor
    inference = InferenceSettings.of({"mode": mode}, "inference_modes[]", base=predictor.inference)
    loader = datamodule.test_dataloader()
    images = [batch["image"] for _, batch in zip(range(cfg.inference_images + 1), loader)]
    times = []
    for image in images:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision in AUTOCAST):
            predictor.probabilities(image.to(device), inference=inference)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / max(1, len(times) - 1)


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


def openvino_version() -> dict:
    """OpenVINO's version and what its CPU plugin reports it can run here (BF16, ...), where it is installed."""
    try:
        import openvino
    except ImportError:
        return {}
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {"openvino": openvino.get_version(), "openvino_cpu_capabilities": list(capabilities)}


def skipped_because(backend: str, precision: str) -> str | None:
    """Why this machine does not run a backend variant, or None."""
    if precision == "bf16" and not cpu_has_bf16():
        return "no native bf16 on this CPU (AVX512-BF16 or AMX)"
    if backend == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "OpenVINO is not installed (pip install -e '.[openvino]')"
    return None


def backend_seconds(cfg: DictConfig, datamodule) -> list[dict]:
    """Seconds per whole test image (batch of one) of the model on each of `cfg.backends` (CPU), with the same
    weights: each variant runs once untimed, then the variants take turns for `cfg.rounds` rounds over
    `cfg.inference_images` images, and each one's fastest round counts."""
    images = [batch["image"] for _, batch in zip(range(cfg.inference_images), datamodule.test_dataloader())]
    torch.manual_seed(cfg.seed)
    contiguous = UNet(cfg.model.in_channels, 1, cfg.model.base_channels, cfg.model.depth).eval()
    nets = {False: contiguous, True: copy.deepcopy(contiguous).to(memory_format=torch.channels_last)}
    # Whole images, one at a time, as the rows say.
    inference = InferenceSettings(mode="whole", batch_size=1)
    rows, predictors = [], {}
    for name in cfg.backends:
        backend, precision, channels_last = BACKEND_VARIANTS[name]
        row = {"variant": name, "backend": backend, "precision": precision, "channels_last": channels_last}
        rows.append(row)
        row["skipped"] = skipped_because(backend, precision)
        if not row["skipped"]:
            start = time.perf_counter()
            runtime = on_backend(nets[channels_last], backend, precision, cfg.model.in_channels)
            predictors[name] = Predictor(runtime, inference, Binarisation())
            row["setup_s"] = time.perf_counter() - start  # OpenVINO: converting and compiling the model

    def run(name: str, image: torch.Tensor) -> None:
        layout = torch.channels_last if BACKEND_VARIANTS[name][2] else torch.contiguous_format
        predictors[name].probabilities(image.contiguous(memory_format=layout))

    best = {}
    with torch.inference_mode():
        for name in predictors:
            run(name, images[0])  # warm-up: first-call allocations, OpenVINO's compilation for this size
        for _ in range(cfg.rounds):
            for name in predictors:
                start = time.perf_counter()
                for image in images:
                    run(name, image)
                best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / len(images))
    baseline = best.get("torch-fp32")
    for row in rows:
        if row["variant"] in best:
            seconds = best[row["variant"]]
            row.update(
                seconds_per_image=seconds,
                seconds_for_20_images=20 * seconds,
                speedup_vs_torch_fp32=baseline / seconds if baseline else None,
            )
    return rows


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
    data_s = data_seconds(cfg, datamodule) if cfg.data_batches else None
    data = {"seconds_per_batch": data_s, "patches_per_s": cfg.data.batch_size / data_s} if data_s else None
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
        "data": data,
        "inference": inference,
        "backends": backend_seconds(cfg, datamodule) if cfg.backends else [],
    }


def table(result: dict) -> str:
    """The measured parts of `result`, one table each."""
    lines = (
        [
            "loop       precision    layout          compiled  patches/s   Mpixels/s   vs plain fp32   vs eager"
            "   first steps s   waiting for data"
        ]
        if result["training"]
        else []
    )
    for row in result["training"]:
        ratios = [f"{row[key]:.2f}x" if row[key] else "-" for key in ("speedup_vs_plain_fp32", "speedup_vs_eager")]
        first = f"{row['first_steps_s']:.1f}" if row["first_steps_s"] is not None else "-"
        share = f"{row['waiting_share']:.1%}" if row["waiting_share"] is not None else "-"
        layout = "channels_last" if row["channels_last"] else "contiguous"
        lines.append(
            f"{row['loop']:<10} {row['precision']:<12} {layout:<15} {str(row['compile']):<9} "
            f"{row['patches_per_s']:>9.1f}   {row['pixels_per_s'] / 1e6:>9.3f}   {ratios[0]:>13}   {ratios[1]:>8}"
            f"   {first:>13}   {share:>16}"
        )
    if result["data"]:
        lines.append(f"training data alone: {result['data']['patches_per_s']:.0f} patches/s")
    if result["inference"]:
        lines.append("inference  precision    s/image     s/20 images")
    for row in result["inference"]:
        lines.append(
            f"{row['mode']:<10} {row['precision']:<12} {row['seconds_per_image']:>7.3f}     {row['seconds_for_20_images']:>7.1f}"
        )
    if result["backends"]:
        lines.append("whole image, by backend      s/image   s/20 images   vs torch fp32   setup s")
    for row in result["backends"]:
        if row["skipped"]:
            lines.append(f"{row['variant']:<28} skipped: {row['skipped']}")
            continue
        ratio = f"{row['speedup_vs_torch_fp32']:.2f}x" if row["speedup_vs_torch_fp32"] else "-"
        lines.append(
            f"{row['variant']:<28} {row['seconds_per_image']:>7.3f}   {row['seconds_for_20_images']:>11.1f}   {ratio:>13}   {row['setup_s']:>7.1f}"
        )
    return "\n".join(lines)


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
