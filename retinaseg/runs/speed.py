"""Timing what the benchmark (`python -m retinaseg.benchmark`) measures: training steps (a plain PyTorch loop
written like the original notebook, and our LightningModule under a Trainer, eager or compiled), the training data
pipeline alone, and whole-image inference by mode and by backend; and its tables."""

import copy
import time
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig

from retinaseg.core.machine import cpu_has_bf16
from retinaseg.inference.backends import on_backend
from retinaseg.inference.binarise import Binarisation
from retinaseg.inference.predictor import Predictor
from retinaseg.inference.settings import InferenceSettings
from retinaseg.model.losses import SegmentationLoss
from retinaseg.model.unet import UNet
from retinaseg.runs.budget import StepTimer, timing_trainer

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


def plain_model(cfg: DictConfig) -> tuple[UNet, SegmentationLoss]:
    """The configured network, seeded, and its loss, without Lightning (model.* as the LightningModule reads it)."""
    torch.manual_seed(cfg.seed)
    network = UNet(cfg.model.in_channels, 1, cfg.model.base_channels, cfg.model.depth)
    return network, SegmentationLoss(cfg.model.loss, cfg.model.cldice_weight, cfg.model.cldice_iterations)


def plain_loop(cfg: DictConfig, loader, precision: str, device: torch.device) -> float:
    """Seconds for cfg.steps timed steps of a notebook-style loop: model, Adam, loss, backward, step."""
    model, loss_fn = plain_model(cfg)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.model.lr)
    model.train()
    for step, batch in enumerate(_batches(loader, cfg.warmup_steps + cfg.steps)):
        if step == cfg.warmup_steps:
            start = time.perf_counter()
        batch = batch.to(device).finish()  # as our module's on_after_batch_transfer does
        x, y = batch["image"], batch["label"]
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


@dataclass(frozen=True)
class DataSeconds:
    """Seconds per batch of the training data alone: the loader's (cutting and stacking the crops and drawing the
    augmentations, on the CPU) and finishing the batches on the training device (moving, warping, cutting and
    standardising: retinaseg.data.augment.PatchBatch)."""

    loader: float
    finishing: float

    @property
    def total(self) -> float:
        return self.loader + self.finishing


def step_flops(cfg: DictConfig) -> float:
    """Floating-point operations of one training step's forward and backward passes on one batch of the configured
    model, loss, patch and batch size: the convolutions and matrix products, as torch.utils.flop_counter counts them
    (BatchNorm, activations, pooling and the optimizer are not counted). The same at every precision."""
    from torch.utils.flop_counter import FlopCounterMode

    model, loss_fn = plain_model(cfg)
    n, size = cfg.data.batch_size, cfg.data.patch_size
    image = torch.randn(n, cfg.model.in_channels, size, size)
    label = (torch.rand(n, 1, size, size) > 0.5).float()
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(image), label).backward()
    return float(counter.get_total_flops())


def matmul_flops_per_s(size: int, precision: str, device: torch.device, repeats: int = 5) -> float:
    """Floating-point operations per second of one square matrix product of `size` at `precision` (its operands in
    the autocast type of the mixed precisions): a ceiling that the training step's convolutions, the same kind of
    arithmetic in the same library, can approach; the best of `repeats` after one untimed."""
    dtype = AUTOCAST.get(precision, torch.float32)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if repeat:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def data_seconds(cfg: DictConfig, datamodule, device: torch.device) -> DataSeconds:
    """The training data's seconds per batch on `device`, over cfg.data_batches batches after one."""
    batches = _batches(datamodule.train_dataloader(), cfg.data_batches + 1)
    next(batches).to(device).finish()  # the workers' start, where data.num_workers > 0, and the device's
    loader = finishing = 0.0
    for _ in range(cfg.data_batches):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        batch.to(device).finish()
        if device.type == "cuda":
            torch.cuda.synchronize()
        loader, finishing = loader + fetched - start, finishing + time.perf_counter() - fetched
    return DataSeconds(loader / cfg.data_batches, finishing / cfg.data_batches)


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
    contiguous = plain_model(cfg)[0].eval()
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


def table(result: dict) -> str:
    """The measured parts of `result`, one table each."""
    lines = (
        [
            "loop       precision    layout          compiled  patches/s   Mpixels/s   vs plain fp32   vs eager"
            "   first steps s   waiting for data   GFLOP/s   of matmul"
        ]
        if result["training"]
        else []
    )
    for row in result["training"]:
        ratios = [f"{row[key]:.2f}x" if row[key] else "-" for key in ("speedup_vs_plain_fp32", "speedup_vs_eager")]
        first = f"{row['first_steps_s']:.1f}" if row["first_steps_s"] is not None else "-"
        share = f"{row['waiting_share']:.1%}" if row["waiting_share"] is not None else "-"
        layout = "channels_last" if row["channels_last"] else "contiguous"
        rate = of_matmul = "-"
        if "gflop_per_s" in row:
            rate, of_matmul = f"{row['gflop_per_s']:.0f}", f"{row['share_of_matmul']:.0%}"
        lines.append(
            f"{row['loop']:<10} {row['precision']:<12} {layout:<15} {str(row['compile']):<9} "
            f"{row['patches_per_s']:>9.1f}   {row['pixels_per_s'] / 1e6:>9.3f}   {ratios[0]:>13}   {ratios[1]:>8}"
            f"   {first:>13}   {share:>16}   {rate:>7}   {of_matmul:>9}"
        )
    if result.get("arithmetic"):
        arithmetic = result["arithmetic"]
        rates = ", ".join(f"{p} {rate:.0f}" for p, rate in arithmetic["matmul_gflop_per_s"].items())
        lines.append(
            f"a training step: {arithmetic['step_gflop']:.1f} GFLOP (convolutions and matrix products); "
            f"a {arithmetic['matmul_size']}x{arithmetic['matmul_size']} matrix product: GFLOP/s {rates}"
        )
    if result["data"]:
        data = result["data"]
        lines.append(
            f"training data alone: {data['patches_per_s']:.0f} patches/s (the loader on the CPU "
            f"{data['loader_patches_per_s']:.0f}, finishing on the {data['device']} {data['finishing_patches_per_s']:.0f})"
        )
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
