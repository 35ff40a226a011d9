"""`python -m retinaseg.eval ckpt_path=<file.ckpt> [data=<dataset>] [split=test|val|train|all] [threshold=val] [tta=true]`:
score a checkpoint by the DRIVE protocol (pooled over the FOV pixels of the split), on its own dataset or any
other, and write what every number comes from."""

import contextlib
import csv
import dataclasses
import io
import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.functional.classification import binary_precision_recall_curve

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, check_bool, check_choice, check_int, check_number, exit_on_user_error
from retinaseg.core.progress import tracked
from retinaseg.core.safe_io import write_atomically, write_png, write_text
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.data.sample import Sample, fov_source
from retinaseg.evaluation import calibration, plots, stats
from retinaseg.evaluation.metrics import DISPLAY, Histograms, Scores, count_images, score
from retinaseg.inference.binarise import Binarisation, binarise
from retinaseg.inference.predictor import Predictor
from retinaseg.model.checkpoint import data_settings, load_checkpoint, resolve_device
from retinaseg.runs.sweeps import in_multirun
from retinaseg.tracking.reports import log_evaluation
from retinaseg.tracking.wandb import finishing_wandb_run

config.setup()
log = logging.getLogger(__name__)

# train: the images the checkpoint trained on (its own data settings), for thresholds chosen beforehand on them
# (retinaseg.evaluation.literature).
SPLITS = ("test", "val", "train", "all")


def predict_samples(predictor: Predictor, samples: list[Sample], what: str) -> dict[str, np.ndarray]:
    """Probability map (H, W) float32 of each sample at its own resolution, by id."""
    return {s.id: predictor.photograph(s.image, s.id) for s in tracked(samples, f"predicting {what}")}


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


# What hysteresis=val and min_size=val choose from: lower thresholds as fractions of the threshold (None: off), and
# the fewest pixels a component keeps (0: all).
HYSTERESIS = (None, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
MIN_SIZES = (0, 10, 20, 30, 50, 75, 100, 150, 200, 300)


def best_binarisation(
    probs: dict[str, np.ndarray], samples: list[Sample], threshold: float, hysteresis, min_size
) -> Binarisation:
    """The binarisation at `threshold` whose F1 pooled over the FOV pixels of `samples` is highest (as
    best_f1_threshold's), hysteresis and min_size each fixed or, where "val", chosen from the candidates above
    (together where both are); of equal F1, the first candidate (the least change)."""
    lows = HYSTERESIS if hysteresis == "val" else [hysteresis]
    sizes = MIN_SIZES if min_size == "val" else [min_size]
    ids, fovs = [s.id for s in samples], [s.fov for s in samples]
    labels, maps = [s.label for s in samples], [probs[s.id] for s in samples]

    def f1(settings: Binarisation) -> float:
        return count_images(ids, maps, labels, fovs, settings, with_histograms=False).total()["f1"]

    candidates = [Binarisation.checked(threshold, low, size) for low in lows for size in sizes]
    return max(candidates, key=f1)  # max keeps the first of equal values


def interval(value: float, ci: tuple[float, float] | None, decimals: int, sign: str = "") -> str:
    """`0.8239 [0.8170, 0.8301]`, or the value alone without an interval."""
    text = f"{value:{sign}.{decimals}f}"
    return text if ci is None else f"{text} [{ci[0]:{sign}.{decimals}f}, {ci[1]:{sign}.{decimals}f}]"


def table(metrics: dict) -> str:
    """The printed summary: one row per metric, one column per scoring; intervals where there are some."""
    columns = [
        ("model", metrics, metrics.get("ci95", {})),
        ("mean per image", metrics["per_image_mean"], {}),
        ("whole image", metrics["whole_image"], {}),
    ]
    if "second_observer" in metrics:
        observer = metrics["second_observer"]
        columns += [
            ("second observer", observer, observer.get("ci95", {})),
            ("2nd obs., whole image", observer["whole_image"], {}),
        ]
    header = [""] + [name for name, _, _ in columns]
    rows = []
    for key, (name, decimals) in DISPLAY.items():
        row = [name] + [
            interval(values[key], cis.get(key), decimals) if key in values else "-" for _, values, cis in columns
        ]
        if "model_minus_second_observer" in metrics:
            difference = metrics["model_minus_second_observer"].get(key)
            row.append(
                "-"
                if difference is None
                else interval(difference["difference"], difference["ci95"], decimals, "+")
                + ("" if difference["p_value"] is None else f" p={difference['p_value']:.2g}")
            )
        rows.append(row)
    if "model_minus_second_observer" in metrics:
        header.append("model - second observer")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    resamples = metrics.get("bootstrap", {}).get("resamples", 0)
    lines = [
        f"{metrics['dataset']} {metrics['split']} split, {metrics['n_images']} images ({metrics['fov']} FOV, scale "
        f"{metrics['scale']:g}), threshold {metrics['threshold']:.4f} ({metrics['threshold_from']}), "
        f"FOV pixels pooled unless noted{', flip TTA' if metrics['tta'] else ''}"
        + (f"; [95% interval]: bootstrap over images, {resamples} resamples" if resamples else "")
        + ("; p: paired permutation test" if resamples and "model_minus_second_observer" in metrics else ""),
        *("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]),
    ]
    if "ece" in metrics:
        lines.append(
            f"expected calibration error {metrics['ece']:.4f} ({calibration.ECE_BINS} equal-width bins, FOV pixels)"
        )
    return "\n".join(lines)


def write_outputs(output_dir: Path, scores: Scores, probs: dict[str, np.ndarray], samples: list[Sample]) -> None:
    """per_image.csv (and per_image_second_observer.csv), histograms.npz (inside and outside the FOV),
    probabilities.npz and predictions/<id>.png (0/255, zero outside the FOV): with metrics.json (`write_metrics`),
    every number can be recomputed from them, and retinaseg.compare needs only metrics.json and the first two. Each
    is written to a temporary name and renamed: a full disk never leaves a partial file under a real name."""
    for name, rows in (("per_image.csv", scores.rows), ("per_image_second_observer.csv", scores.observer_rows)):
        if rows:
            table = io.StringIO()
            writer = csv.DictWriter(table, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            write_text(output_dir / name, table.getvalue())
    histograms = scores.counts.histograms
    # The pixels outside the FOV too, in the same bins: papers that score whole images (retinaseg.evaluation.protocols).
    outside = Histograms.of(
        [probs[s.id][~s.fov] for s in samples],
        [s.label[~s.fov] > 0 for s in samples],
        histograms.positive.shape[1],
        histograms.logit_range,
    )
    arrays = {
        "ids": np.array(scores.counts.ids),
        "positive": histograms.positive.astype(np.uint32),  # a count per image fits
        "negative": histograms.negative.astype(np.uint32),
        "outside_positive": outside.positive.astype(np.uint32),
        "outside_negative": outside.negative.astype(np.uint32),
        "logit_range": histograms.logit_range,
    }
    write_atomically(output_dir / "histograms.npz", lambda file: np.savez_compressed(file, **arrays))
    write_atomically(output_dir / "probabilities.npz", lambda file: np.savez_compressed(file, **probs))
    for s in samples:
        mask = binarise(probs[s.id], s.fov, scores.binarisation)
        write_png(output_dir / "predictions" / f"{s.id}.png", mask.astype(np.uint8) * 255)


def fov_pixels(probs: dict[str, np.ndarray], samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities and labels of the FOV pixels of `samples`, pooled."""
    fov_probs = torch.cat([torch.from_numpy(probs[s.id][s.fov]) for s in samples])
    fov_labels = torch.cat([torch.from_numpy(s.label[s.fov]) for s in samples])
    return fov_probs, fov_labels


def write_metrics(output_dir: Path, metrics: dict) -> None:
    """metrics.json, written after every other file of the evaluation: where it is, the evaluation finished."""
    write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def draw_plots(
    output_dir: Path,
    metrics: dict,
    probs: dict[str, np.ndarray],
    samples: list[Sample],
    num_images: int,
    reliability: calibration.Reliability,
    binarisation: Binarisation,
) -> dict[str, Path]:
    """plots/roc_pr.png and plots/reliability.png of the split, and plots/predictions.png of its first
    `num_images` images (none for 0)."""
    threshold = metrics["threshold"]
    points = {f"model at threshold {threshold:.3g}": metrics}
    if "second_observer" in metrics:
        points["second observer"] = metrics["second_observer"]
    fov_probs, fov_labels = fov_pixels(probs, samples)
    title = (
        f"{metrics['dataset']} {metrics['split']} split, {len(samples)} images, FOV pixels pooled, "
        f"{plots.inference_words(metrics['tta'])}; operating point: probability > {threshold:.3g} "
        f"(threshold: {metrics['threshold_from']})"
    )
    figures = {
        "plots/roc_pr": plots.roc_pr_curves(
            fov_probs, fov_labels, metrics["auc"], points, output_dir / "plots" / "roc_pr.png", title
        ),
        "plots/reliability": plots.reliability_diagram(reliability, output_dir / "plots" / "reliability.png", title),
    }
    if num_images > 0:
        rows = [
            {"id": s.id, "image": s.image, "label": s.label, "fov": s.fov, "prob": probs[s.id]}
            for s in samples[:num_images]
        ]
        figures["plots/predictions"] = plots.results_grid(
            rows, binarisation, output_dir / "plots" / "predictions.png", metrics["tta"]
        )
    return figures


def evaluate(cfg: DictConfig) -> dict:
    """Score `cfg.ckpt_path` on `cfg.split`, write the run directory's files, return metrics.json's content."""
    check_choice("split", cfg.split, SPLITS)
    threshold = check_number("threshold", cfg.threshold, 0, 1, or_one_of=("val",))
    hysteresis = check_number("hysteresis", cfg.hysteresis, 0, 1, include_minimum=False, or_one_of=("val", None))
    min_size = check_int("min_size", cfg.min_size, minimum=0, or_one_of=("val", None))
    check_bool("tta", cfg.tta)
    check_int("plot_images", cfg.plot_images, minimum=0)
    stats.check_resamples("bootstrap", cfg.bootstrap)
    check_int("seed", cfg.seed)
    device = resolve_device(cfg.device)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    settings = {"threshold": threshold, "hysteresis": hysteresis, "min_size": min_size}
    chosen = [name for name, value in settings.items() if value == "val"]
    if checkpoint.from_state_dict and (chosen or cfg.split == "val"):
        raise ConfigError(
            f"{checkpoint.path} is a plain state_dict, which does not record the images its training held out for "
            "validation: score it on split=test with a fixed threshold (threshold=0.5, the original's)."
        )
    # Unset options are the checkpoint's own (model.hysteresis, model.min_size); "val" ones are chosen below.
    predictor = checkpoint.predictor(
        device,
        OmegaConf.to_container(cfg.inference),
        cfg.tta,
        threshold=None if threshold == "val" else threshold,
        hysteresis=None if hysteresis == "val" else hysteresis,
        min_size=None if min_size == "val" else min_size,
    )
    hysteresis = predictor.binarisation.hysteresis if hysteresis is None else hysteresis
    min_size = predictor.binarisation.min_size if min_size is None else min_size
    own, target = data_settings(checkpoint, OmegaConf.to_container(cfg.data, resolve=True))
    if cfg.split == "val" and target is not own:
        raise ConfigError(
            f"split=val scores the validation images the checkpoint's training held out of its own dataset "
            f"({own['dataset']}), not images of data={target.get('dataset')}: leave data unset for split=val, or "
            "score the other dataset with split=test or split=all (threshold=val still picks the threshold on the "
            "checkpoint's own validation images)."
        )
    own_data = FundusDataModule(**own)
    data = own_data if target is own else FundusDataModule(**target)

    if chosen or cfg.split == "val":
        # The training images only: test labels are never read to choose the threshold or the options.
        val_samples = own_data.samples("val")
        own_predictor = dataclasses.replace(predictor, preprocessing=own_data.preprocessing)
        val_probs = predict_samples(own_predictor, val_samples, "validation images")
    if threshold == "val":
        threshold = best_f1_threshold(val_probs, val_samples)
        log.info("threshold %.4f maximises F1 on the %d validation images", threshold, len(val_samples))
    if "val" in (hysteresis, min_size):
        binarisation = best_binarisation(val_probs, val_samples, threshold, hysteresis, min_size)
        log.info(
            "hysteresis %s and min_size %d maximise F1 on the %d validation images",
            binarisation.hysteresis,
            binarisation.min_size,
            len(val_samples),
        )
    else:
        binarisation = Binarisation.checked(threshold, hysteresis, min_size)
    if cfg.split == "val":
        data, samples, probs = own_data, val_samples, val_probs
    else:
        samples = data.samples(cfg.split)
        probs = predict_samples(
            dataclasses.replace(predictor, preprocessing=data.preprocessing), samples, f"{cfg.split} images"
        )

    observer = None
    if all(s.second_label is not None for s in samples):
        observer = [s.second_label for s in samples]
    scores = score(
        [s.id for s in samples],
        [probs[s.id] for s in samples],
        [s.label for s in samples],
        [s.fov for s in samples],
        binarisation,
        observer,
        cfg.bootstrap,
        cfg.seed,
    )
    metrics = scores.metrics
    reliability = calibration.Reliability.of(*(pixels.numpy() for pixels in fov_pixels(probs, samples)))
    metrics.update(
        ece=reliability.ece,
        threshold=float(threshold),
        threshold_from="validation F1" if cfg.threshold == "val" else "fixed",
        binarisation={
            **binarisation.to_json(),
            "chosen_on_validation_images": [name for name in chosen if name != "threshold"],
        },
        region="fov",
        dataset=data.hparams.dataset,
        split=cfg.split,
        n_images=len(samples),
        fov=fov_source(samples),
        scale=data.preprocessing.scale,
        tta=bool(cfg.tta),
        inference=predictor.description(),
        checkpoint=checkpoint.name or str(checkpoint.path.resolve()),
        bootstrap={"resamples": cfg.bootstrap, "seed": cfg.seed, "level": 0.95},
    )
    write_outputs(output_dir, scores, probs, samples)
    figures = draw_plots(output_dir, metrics, probs, samples, cfg.plot_images, reliability, binarisation)
    write_metrics(output_dir, metrics)
    # A W&B run joins the group of the training run that wrote the checkpoint.
    loggers = config.instantiate_group(cfg.get("logger"), wandb={"training_group": checkpoint.wandb_group})
    log_evaluation(loggers, metrics, scores.rows, figures, samples[: cfg.plot_images], probs, checkpoint, predictor.net)
    print(table(metrics))
    log.info("evaluation of %s written to %s", metrics["checkpoint"], output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    # In a sweep a failing job is left to Hydra, which records it and goes on (retinaseg.runs.sweeps reports it).
    with contextlib.nullcontext() if in_multirun() else exit_on_user_error(), finishing_wandb_run():
        evaluate(cfg)


if __name__ == "__main__":
    main()
