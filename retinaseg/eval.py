"""`python -m retinaseg.eval ckpt_path=<file.ckpt> [split=val] [threshold=val] [tta=true]`: score a checkpoint
by the DRIVE protocol (pooled over the FOV pixels of the split) and write what every number comes from."""

import csv
import io
import json
import logging
import os
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import track
from torchmetrics.functional.classification import binary_precision_recall_curve

from retinaseg import config, plots, tracking
from retinaseg.checkpoint import Checkpoint, load_checkpoint, resolve_device
from retinaseg.data.datamodule import FundusDataModule, normalize
from retinaseg.data.sample import Sample
from retinaseg.errors import ConfigError, check_bool, check_choice, check_int, check_number, exit_on_user_error
from retinaseg.metrics import REPORTED, FOVMetrics, reported
from retinaseg.module import VesselSegmentationModule
from retinaseg.runs.safe_io import write_atomically, write_png, write_text
from retinaseg.train import instantiate_group

config.setup()
log = logging.getLogger(__name__)

SPLITS = ("test", "val")
# Columns of the printed table (recall is sensitivity under its other name).
TABLE = (
    ("F1", "f1"),
    ("AUC", "auc"),
    ("Acc", "accuracy"),
    ("Sens", "sensitivity"),
    ("Spec", "specificity"),
    ("Prec", "precision"),
    ("IoU", "iou"),
)


def data_settings(checkpoint: Checkpoint, overrides: dict) -> dict:
    """The checkpoint's data settings with the non-null `overrides`; a DRIVE path that does not exist
    here (a checkpoint from another machine, or none recorded) is replaced by $DRIVE_ROOT unless data.root is given."""
    settings = dict(checkpoint.data)
    settings.update({key: value for key, value in overrides.items() if value is not None})
    env_root = os.environ.get("DRIVE_ROOT")
    if (
        settings["source"] == "drive"
        and overrides.get("root") is None
        and not Path(str(settings.get("root"))).exists()
        and env_root
    ):
        log.info(
            "the checkpoint's data.root %s does not exist here; using DRIVE_ROOT=%s", settings.get("root"), env_root
        )
        settings["root"] = env_root
    return settings


def predict_samples(
    module: VesselSegmentationModule, samples: list[Sample], mean, std, tta: bool, what: str
) -> dict[str, np.ndarray]:
    """Probability map (H, W) float32 of each sample, by id."""
    device = module.device
    probs = {}
    for sample in track(samples, description=f"predicting {what}", transient=True):
        image = normalize(sample.image, mean, std)[None].to(device)
        probs[sample.id] = module.predict_probabilities(image, tta)[0, 0].cpu().numpy()
    return probs


def best_f1_threshold(probs: dict[str, np.ndarray], samples: list[Sample]) -> float:
    """The threshold that maximises F1 pooled over the FOV pixels of `samples`."""
    p = torch.cat([torch.from_numpy(probs[s.id][s.fov]) for s in samples])
    t = torch.cat([torch.from_numpy(s.label[s.fov]) for s in samples]).long()
    precision, recall, thresholds = binary_precision_recall_curve(p, t)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    best = int(f1[:-1].argmax())  # the last point (precision 1, recall 0) has no threshold
    # The curve counts prob >= thresholds[best] as vessel, FOVMetrics prob > threshold: a threshold halfway
    # to the next lower probability selects the same pixels both ways.
    below = float(thresholds[best - 1]) if best > 0 else 0.0
    return (float(thresholds[best]) + below) / 2


def observed(values: dict) -> dict[str, float]:
    """The reported metrics of a binary mask (no AUC)."""
    return {key: value for key, value in reported({"auc": float("nan"), **values}).items() if key != "auc"}


def score(probs: dict[str, np.ndarray], samples: list[Sample], threshold: float) -> dict:
    """Pooled FOV metrics, per-image rows, whole-image metrics, and the second observer where every sample has one."""
    pooled, whole, single = FOVMetrics(threshold), FOVMetrics(threshold), FOVMetrics(threshold)
    has_observer = all((s.extra or {}).get("2nd_manual") is not None for s in samples)
    # A binary mask has no ROC curve, so the observer gets no AUC.
    observer, observer_whole = FOVMetrics(threshold, with_auc=False), FOVMetrics(threshold, with_auc=False)
    per_image = []
    for s in samples:
        prob, label, fov = torch.from_numpy(probs[s.id]), torch.from_numpy(s.label), torch.from_numpy(s.fov)
        pooled.update(prob, label, fov)
        whole.update(prob, label)
        single.update(prob, label, fov)
        per_image.append({"id": s.id, **reported(single.compute())})
        single.reset()
        if has_observer:
            second = torch.from_numpy(s.extra["2nd_manual"]).float()
            observer.update(second, label, fov)
            observer_whole.update(second, label)
    result = {
        "pooled": reported(pooled.compute()),
        "per_image": per_image,
        "per_image_mean": {key: float(np.mean([row[key] for row in per_image])) for key in REPORTED},
        "whole_image": reported(whole.compute()),
    }
    if has_observer:
        result["second_observer"] = {**observed(observer.compute()), "whole_image": observed(observer_whole.compute())}
    return result


def table(metrics: dict) -> str:
    """The printed summary: one row per scoring, one column per metric."""
    rows = [
        ("model", metrics),
        ("model, mean per image", metrics["per_image_mean"]),
        ("model, whole image", metrics["whole_image"]),
    ]
    if "second_observer" in metrics:
        rows += [
            ("second observer", metrics["second_observer"]),
            ("second obs., whole image", metrics["second_observer"]["whole_image"]),
        ]
    lines = [
        f"{metrics['split']} split, {metrics['n_images']} images, threshold {metrics['threshold']:.4f} ({metrics['threshold_from']}), "
        f"FOV pixels pooled unless noted{', flip TTA' if metrics['tta'] else ''}",
        f"{'':<26}" + "".join(f"{name:>8}" for name, _ in TABLE),
    ]
    lines += [
        f"{name:<26}" + "".join(f"{values[key]:>8.4f}" if key in values else f"{'-':>8}" for _, key in TABLE)
        for name, values in rows
    ]
    return "\n".join(lines)


def write_outputs(
    output_dir: Path, metrics: dict, per_image: list[dict], probs: dict[str, np.ndarray], samples: list[Sample]
) -> None:
    """metrics.json, per_image.csv, probabilities.npz and predictions/<id>.png (0/255, zero outside the FOV), each
    written to a temporary name and renamed: a full disk never leaves a partial file under a real name."""
    write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["id", *REPORTED])
    writer.writeheader()
    writer.writerows(per_image)
    write_text(output_dir / "per_image.csv", table.getvalue())
    write_atomically(output_dir / "probabilities.npz", lambda file: np.savez_compressed(file, **probs))
    for s in samples:
        mask = (probs[s.id] > metrics["threshold"]) & s.fov
        write_png(output_dir / "predictions" / f"{s.id}.png", mask.astype(np.uint8) * 255)


def draw_plots(
    output_dir: Path, metrics: dict, probs: dict[str, np.ndarray], samples: list[Sample], num_images: int
) -> dict[str, Path]:
    """plots/roc_pr.png of the split and plots/predictions.png of its first `num_images` images (none for 0)."""
    threshold = metrics["threshold"]
    points = {f"model at threshold {threshold:.3g}": metrics}
    if "second_observer" in metrics:
        points["second observer"] = metrics["second_observer"]
    fov_probs = torch.cat([torch.from_numpy(probs[s.id][s.fov]) for s in samples])
    fov_labels = torch.cat([torch.from_numpy(s.label[s.fov]) for s in samples])
    title = f"{metrics['split']} split, {len(samples)} images, FOV pixels pooled"
    figures = {
        "plots/roc_pr": plots.roc_pr_curves(
            fov_probs, fov_labels, metrics["auc"], points, output_dir / "plots" / "roc_pr.png", title
        )
    }
    if num_images > 0:
        rows = [
            {"id": s.id, "image": s.image, "label": s.label, "fov": s.fov, "prob": probs[s.id]}
            for s in samples[:num_images]
        ]
        figures["plots/predictions"] = plots.results_grid(rows, threshold, output_dir / "plots" / "predictions.png")
    return figures


def evaluate(cfg: DictConfig) -> dict:
    """Score `cfg.ckpt_path` on `cfg.split`, write the run directory's files, return metrics.json's content."""
    check_choice("split", cfg.split, SPLITS)
    threshold = check_number("threshold", cfg.threshold, 0, 1, or_one_of=("val",))
    check_bool("tta", cfg.tta)
    check_int("plot_images", cfg.plot_images, minimum=0)
    device = resolve_device(cfg.device)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    if checkpoint.from_state_dict and (threshold == "val" or cfg.split == "val"):
        raise ConfigError(
            f"{checkpoint.path} is a plain state_dict, which does not record the images its training held out for "
            "validation: score it on split=test with a fixed threshold (threshold=0.5, the original's)."
        )
    module = checkpoint.build_module(OmegaConf.to_container(cfg.inference)).to(device)
    settings = data_settings(checkpoint, OmegaConf.to_container(cfg.data))
    data = FundusDataModule(**settings)

    val_probs = None
    if threshold == "val" or cfg.split == "val":
        data.setup("validate")  # the training images only: test labels are not read to choose the threshold
        val_probs = predict_samples(
            module, data.val_samples, settings["mean"], settings["std"], cfg.tta, "validation images"
        )
    if threshold == "val":
        threshold = best_f1_threshold(val_probs, data.val_samples)
        log.info("threshold %.4f maximises F1 on the %d validation images", threshold, len(data.val_samples))
    if cfg.split == "val":
        samples, probs = data.val_samples, val_probs
    else:
        data.setup("test")
        samples = data.test_samples
        probs = predict_samples(module, samples, settings["mean"], settings["std"], cfg.tta, "test images")

    result = score(probs, samples, float(threshold))
    metrics = {
        **result["pooled"],
        "threshold": float(threshold),
        "threshold_from": "validation F1" if cfg.threshold == "val" else "fixed",
        "region": "fov",
        "split": cfg.split,
        "n_images": len(samples),
        "tta": bool(cfg.tta),
        "inference": module.inference,
        "checkpoint": str(Path(cfg.ckpt_path).expanduser().resolve()),
        "per_image_mean": result["per_image_mean"],
        "whole_image": result["whole_image"],
    }
    if "second_observer" in result:
        metrics["second_observer"] = result["second_observer"]
    write_outputs(output_dir, metrics, result["per_image"], probs, samples)
    figures = draw_plots(output_dir, metrics, probs, samples, cfg.plot_images)
    # A W&B run joins the group of the training run that wrote the checkpoint.
    loggers = instantiate_group(cfg.get("logger"), wandb={"training_group": checkpoint.wandb_group})
    tracking.log_evaluation(
        loggers, metrics, result["per_image"], figures, samples[: cfg.plot_images], probs, checkpoint, module
    )
    print(table(metrics))
    log.info("evaluation of %s written to %s", metrics["checkpoint"], output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(), tracking.finishing_wandb_run():
        evaluate(cfg)


if __name__ == "__main__":
    main()
