"""Figures of a run: training curves, an image | label | prediction | errors grid, ROC and PR curves, the
reliability diagram, and an evaluation's figures (`draw_plots`).

Figures are drawn on matplotlib's Agg canvas through `Figure` (not pyplot), so they never open a
window, need no display and leave the caller's matplotlib state alone.
"""

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from torchmetrics.functional.classification import binary_roc

from retinaseg.core.safe_io import write_atomically
from retinaseg.data.sample import Sample
from retinaseg.evaluation.calibration import Reliability
from retinaseg.evaluation.scoring import fov_pixels
from retinaseg.inference.binarise import Binarisation, as_binarisation, binarise

# Error map colours, told apart also by red-green colour-blind readers.
TP_COLOUR, FP_COLOUR, FN_COLOUR = (255, 255, 255), (255, 90, 30), (0, 160, 255)
OUTSIDE_FOV = (45, 45, 45)
# (panel title, train column, validation column) of Lightning's CSV log.
CURVES = (
    ("loss", "train/loss_epoch", "val/loss"),
    ("recall", "train/recall", "val/recall"),
    ("precision", "train/precision", "val/precision"),
    ("F1", "train/f1", "val/f1"),
)
# The training loss as logged every trainer.log_every_n_steps steps, drawn in the loss panel.
STEP_LOSS = "train/loss_step"
MAX_EPOCH_TICKS = 12  # epoch ends marked on the curves' top axis (every few epochs in a longer run)
CURVE_POINTS = 2000  # points drawn per curve: plenty for the eye, cheap for the file


def save(fig: Figure, path: str | Path) -> Path:
    return write_atomically(path, lambda file: fig.savefig(file, format="png", dpi=100, bbox_inches="tight"))


@dataclass(frozen=True)
class LoggedValues:
    """What a Lightning metrics.csv holds for curves: per column, its value at each step it was logged (the last one
    logged at that step), and the last step logged in each epoch."""

    values: dict[str, dict[int, float]]
    epoch_ends: dict[int, int]


def logged_values(metrics_csv: str | Path) -> LoggedValues:
    values: dict[str, dict[int, float]] = {}
    epoch_ends: dict[int, int] = {}
    with open(metrics_csv, newline="") as file:
        for row in csv.DictReader(file):
            if not row.get("epoch"):
                continue
            epoch, step = int(float(row["epoch"])), int(float(row["step"]))
            logged = {key: float(value) for key, value in row.items() if key not in ("epoch", "step") and value}
            for key, value in logged.items():
                values.setdefault(key, {})[step] = value
            if any(key.startswith(("train/", "val/")) for key in logged):  # not the test's rows, after the last epoch
                epoch_ends[epoch] = max(step, epoch_ends.get(epoch, step))
    return LoggedValues(values, epoch_ends)


def training_curves(metrics_csv: str | Path, path: str | Path) -> Path:
    """Loss, recall, precision and F1 against optimizer steps, train and validation (the original's metrics.jpg),
    the training loss also as logged every few steps; the top axis marks the end of each epoch (of every few,
    for long runs)."""
    logged = logged_values(metrics_csv)
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    for ax, (title, train_key, val_key) in zip(fig.subplots(2, 2).flat, CURVES):
        lines = [(train_key, "train", "C0"), (val_key, "validation", "C1")]
        if title == "loss":
            lines.insert(0, (STEP_LOSS, "train, every few steps", "C0"))
        for key, label, colour in lines:
            points = sorted(logged.values.get(key, {}).items())
            if points:
                steps, ys = zip(*points)
                style = {"linewidth": 0.8, "alpha": 0.5} if key == STEP_LOSS else {"marker": "o", "markersize": 3}
                # A row's step counts the steps before it: +1 gives the optimizer steps done when it was logged.
                ax.plot([s + 1 for s in steps], ys, label=label, color=colour, **style)
        ax.set_title(title)
        ax.set_xlabel("optimizer steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
        if logged.epoch_ends:
            every = max(1, math.ceil(len(logged.epoch_ends) / MAX_EPOCH_TICKS))
            ends = sorted(logged.epoch_ends.items())[every - 1 :: every]
            top = ax.secondary_xaxis("top")
            top.set_xticks([step + 1 for _, step in ends], [str(epoch + 1) for epoch, _ in ends])
            top.set_xlabel("end of epoch", fontsize=9)
            top.tick_params(labelsize=8)
    fig.suptitle("Training curves (metrics inside the FOV)")
    return save(fig, path)


def error_map(prediction: np.ndarray, label: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: true positives, false positives and false negatives in three colours, grey outside the FOV."""
    prediction, label, fov = prediction.astype(bool), label.astype(bool), fov.astype(bool)
    out = np.zeros((*label.shape, 3), np.uint8)
    out[~fov] = OUTSIDE_FOV
    out[prediction & label & fov] = TP_COLOUR
    out[prediction & ~label & fov] = FP_COLOUR
    out[~prediction & label & fov] = FN_COLOUR
    return out


def displayable(image: np.ndarray | torch.Tensor, size: Sequence[int] | None = None) -> np.ndarray:
    """An image as (H, W, 3) for imshow: uint8 as is, a normalised (3, H, W) tensor stretched to [0, 1]; resized
    to `size` (H, W) where given (the model may see photographs at another resolution than their labels')."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()
    if image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = ((image - low) / max(high - low, 1e-8)).astype(np.float32)
    if size is not None and image.shape[:2] != tuple(size):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return image


def inference_words(tta: bool) -> str:
    """How the probabilities were made, for titles."""
    return "flip TTA" if tta else "no TTA"


def results_grid(
    rows: Sequence[Mapping], binarisation: Binarisation | float, path: str | Path, tta: bool = False
) -> Path:
    """One row per image: image | label | prediction | error map (the original's results.jpg, plus errors).

    Each row is a mapping with id, image ((H, W, 3) uint8 or a normalised (3, H, W) tensor), label, fov
    and prob ((H, W) arrays); the prediction is prob binarised inside the FOV (retinaseg.inference.binarise; a number: prob
    > that threshold). `tta`: whether the probabilities were averaged over flips (said in the title).
    """
    binarisation = as_binarisation(binarisation)
    fig = Figure(figsize=(12, 3.2 * len(rows)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), 4, squeeze=False))
    for ax_row, row in zip(axes, rows):
        label, fov = np.asarray(row["label"]).astype(bool), np.asarray(row["fov"]).astype(bool)
        prediction = binarise(np.asarray(row["prob"]), fov, binarisation)
        tp, fp, fn = (
            (prediction & label & fov).sum(),
            (prediction & ~label & fov).sum(),
            (~prediction & label & fov).sum(),
        )
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        panels = (displayable(row["image"], label.shape), label, prediction, error_map(prediction, label, fov))
        titles = (str(row["id"]), "label", f"prediction (F1 {f1:.3f})", "errors")
        for ax, panel, title in zip(ax_row, panels, titles):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    legend = [
        Patch(color=np.array(c) / 255, label=name)
        for c, name in ((TP_COLOUR, "true positive"), (FP_COLOUR, "false positive"), (FN_COLOUR, "false negative"))
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, facecolor="0.8")
    fig.suptitle(f"Image | label | prediction: {binarisation.words()} inside the FOV ({inference_words(tta)}) | errors")
    return save(fig, path)


def _thin(*curves: torch.Tensor) -> list[np.ndarray]:
    """At most CURVE_POINTS evenly spaced points of curves given point by point (ends kept)."""
    index = torch.linspace(0, len(curves[0]) - 1, min(len(curves[0]), CURVE_POINTS)).round().long()
    return [c[index].numpy() for c in curves]


def roc_pr_curves(
    probs: torch.Tensor,
    labels: torch.Tensor,
    auc: float,
    points: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str,
) -> Path:
    """ROC and precision-recall curves of pooled pixels, with operating points marked.

    `points` maps a name (e.g. "model at 0.5", "second observer") to its sensitivity, specificity and precision.
    """
    probs, labels = probs.flatten().float(), labels.flatten().long()
    fpr, tpr, _ = binary_roc(probs, labels)
    # Precision from the same sort: true and false positives are the rates times the class counts.
    positives = labels.sum().double()
    tp, fp = tpr.double() * positives, fpr.double() * (len(labels) - positives)
    predicted = tp + fp > 0  # the ROC's first point predicts nothing: it has no precision
    precision, recall = tp[predicted] / (tp + fp)[predicted], tpr[predicted]
    fig = Figure(figsize=(11, 5), layout="constrained")
    roc, pr = fig.subplots(1, 2)
    # A logarithmic false-positive axis: vessel maps are read at FPR < 0.1 (specificity > 0.9), which a linear axis
    # squeezes into its first tenth. It starts at one false pixel (FPR 0 has no place on it), or 1e-4.
    lowest = max(1e-4, 1 / max(1, len(labels) - int(positives)))
    roc.plot(*_thin(fpr, tpr), label=f"model (AUC {auc:.4f})")
    chance = np.logspace(np.log10(lowest), 0, 100)
    roc.plot(chance, chance, color="0.6", linestyle="--", linewidth=1, label="chance")
    roc.set(
        xlabel="false positive rate (1 - specificity), log scale",
        ylabel="true positive rate (sensitivity)",
        title="ROC",
        xscale="log",
        xlim=(lowest, 1),
        ylim=(0, 1.02),
    )
    pr.plot(*_thin(recall, precision), label="model")
    pr.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    for (name, p), marker in zip(points.items(), "os^D"):
        roc.plot(1 - p["specificity"], p["sensitivity"], marker, markersize=8, label=name)
        pr.plot(p["sensitivity"], p["precision"], marker, markersize=8, label=name)
    for ax in (roc, pr):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left" if ax is roc else "lower left")
    fig.suptitle(title)
    return save(fig, path)


def reliability_diagram(reliability: Reliability, path: str | Path, title: str) -> Path:
    """Above: each bin's fraction of vessel pixels against its mean probability (on the diagonal where calibrated),
    with the ECE; below: how many pixels each bin holds (log scale: most pixels are sure background)."""
    edges, filled = reliability.edges, reliability.count > 0
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig = Figure(figsize=(5.5, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(centres[filled], reliability.frequency[filled], width=width, edgecolor="black", label="vessel fraction")
    top.plot(
        reliability.confidence[filled], reliability.frequency[filled], "o", color="C1", label="at mean probability"
    )
    top.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="calibrated")
    top.set(ylabel="fraction of pixels that are vessel", xlim=(0, 1), ylim=(0, 1))
    top.set_title(f"ECE {reliability.ece:.4f} ({len(reliability.count)} equal-width bins)")
    top.legend(loc="upper left")
    bottom.bar(centres[filled], reliability.count[filled], width=width, color="0.6", edgecolor="black")
    bottom.set(xlabel="predicted vessel probability", ylabel="pixels", yscale="log")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save(fig, path)


def draw_plots(
    directory: Path,
    metrics: dict,
    probs: dict[str, np.ndarray],
    samples: list[Sample],
    num_images: int,
    reliability: Reliability,
    binarisation: Binarisation,
) -> dict[str, Path]:
    """An evaluation's figures in `directory` (its plots/): roc_pr.png and reliability.png of the split, and
    predictions.png of its first `num_images` images (none for 0); by W&B key."""
    threshold = metrics["threshold"]
    points = {f"model at threshold {threshold:.3g}": metrics}
    if "second_observer" in metrics:
        points["second observer"] = metrics["second_observer"]
    fov_probs, fov_labels = fov_pixels(probs, samples)
    title = (
        f"{metrics['dataset']} {metrics['split']} split, {len(samples)} images, FOV pixels pooled, "
        f"{inference_words(metrics['tta'])}; operating point: probability > {threshold:.3g} "
        f"(threshold: {metrics['threshold_from']})"
    )
    figures = {
        "plots/roc_pr": roc_pr_curves(fov_probs, fov_labels, metrics["auc"], points, directory / "roc_pr.png", title),
        "plots/reliability": reliability_diagram(reliability, directory / "reliability.png", title),
    }
    if num_images > 0:
        rows = [
            {"id": s.id, "image": s.image, "label": s.label, "fov": s.fov, "prob": probs[s.id]}
            for s in samples[:num_images]
        ]
        figures["plots/predictions"] = results_grid(rows, binarisation, directory / "predictions.png", metrics["tta"])
    return figures


def log_images(loggers: Sequence, images: Mapping[str, Path], step: int | None = None) -> None:
    """Send figure files to the loggers that take images (those with `log_image`, e.g. W&B's); skip the others."""
    for logger in loggers:
        if hasattr(logger, "log_image"):
            for key, path in images.items():
                logger.log_image(key=key, images=[str(path)], step=step)
