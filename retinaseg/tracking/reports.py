"""An evaluation's and a benchmark's results to the run's loggers (retinaseg.eval calls `log_evaluation`,
retinaseg.benchmark `log_benchmark`): numbers flattened into metrics, lists as W&B tables."""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from retinaseg.core.machine import git_commit, run_facts
from retinaseg.data.sample import Sample
from retinaseg.evaluation.directory import EvaluationSettings
from retinaseg.evaluation.plots import log_images
from retinaseg.model.checkpoint import Checkpoint
from retinaseg.tracking.wandb import use_training_artifact, vessel_masks


def flat_numbers(values: Mapping, prefix: str) -> dict[str, float]:
    """The numbers in `values`, nested keys joined by `/` under `prefix` (`test/per_image_mean/f1`); a pair of
    numbers (an interval, as in `ci95: {f1: [lo, hi]}`) as `.../lo` and `.../hi`. Strings, booleans and other
    lists are left out."""

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    flat = {}
    for key, value in values.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            flat.update(flat_numbers(value, name))
        elif number(value):
            flat[name] = value
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(number(v) for v in value):
            flat[f"{name}/lo"], flat[f"{name}/hi"] = value
    return flat


# The settings of an evaluation that are logged among its numbers (`test/threshold`, `test/n_images`,
# `test/binarisation/min_size`, ...), where a dashboard plots them beside the scores; the others are hyperparameters.
SETTINGS_AS_NUMBERS = ("threshold", "n_images", "binarisation")


def log_evaluation(
    loggers: Sequence[Logger],
    numbers: dict,
    settings: EvaluationSettings,
    per_image: list[dict],
    figures: Mapping[str, Path],
    examples: Sequence[Sample],
    probs: Mapping[str, np.ndarray],
    checkpoint: Checkpoint,
    model: torch.nn.Module,
) -> None:
    """An evaluation (its `numbers` and `settings`, as metrics.json holds them, and its per-image rows) to the run's
    loggers, each then closed.

    Every logger gets the settings and the checkpoint's model and data settings as hyperparameters, with the id of
    the W&B run that trained it (`training_run_id`), every number flattened under the split (`flat_numbers`:
    `test/f1`, `test/per_image_mean/f1`, intervals as `test/ci95/f1/lo`) and the `figures`. A W&B run also gets the
    per-image rows as a table (`<split>/per_image`), the `examples` with their true and predicted vessels
    (`<split>/predictions`), `run_facts` in its summary and, online, the training run's best model artifact as its
    input (W&B's lineage: which checkpoint gave these scores).
    """
    split, recorded = settings.split, settings.to_json()
    hparams = {
        **{key: value for key, value in recorded.items() if key not in SETTINGS_AS_NUMBERS},
        "training_run_id": checkpoint.wandb_run_id,
        "model": checkpoint.hyper_parameters,
        "data": checkpoint.data,
    }
    flat = flat_numbers({**numbers, **{key: recorded[key] for key in SETTINGS_AS_NUMBERS if key in recorded}}, split)
    for logger in loggers:
        logger.log_hyperparams(hparams)
        logger.log_metrics(flat, step=0)
        log_images([logger], figures)
        if isinstance(logger, LightningWandbLogger):
            log_rows(logger, f"{split}/per_image", per_image)
            if examples:
                logger.log_image(
                    f"{split}/predictions",
                    images=[s.image for s in examples],
                    caption=[s.id for s in examples],
                    masks=[vessel_masks(s.label, (probs[s.id] > settings.threshold) & s.fov) for s in examples],
                )
            logger.experiment.summary.update(run_facts(model, next(model.parameters()).device))
            use_training_artifact(logger, checkpoint.wandb_run_id)
        logger.save()
        logger.finalize("success")


def log_rows(logger: LightningWandbLogger, key: str, rows: Sequence[Mapping]) -> None:
    """`rows` (dicts, not all with the same keys) as a W&B table: one column per key, in order of appearance."""
    columns = list(dict.fromkeys(column for row in rows for column in row))
    logger.log_table(key, columns, [[row.get(column) for column in columns] for row in rows])


def log_benchmark(loggers: Sequence[Logger], result: dict) -> None:
    """A benchmark's `result` (retinaseg.benchmark's JSON) to the run's loggers, each then closed: its settings as
    hyperparameters; `train/<name>/<precision>/patches_per_s` (and pixels/s, speed-up) and
    `inference/<mode>/seconds_per_image` and `backends/<variant>/seconds_per_image` as metrics; a W&B run also
    gets the lists as tables and the machine in its summary."""
    numbers = {}
    for row in result["training"]:
        numbers.update(flat_numbers(row, f"train/{row['name']}/{row['precision']}"))
    for row in result["inference"]:
        numbers.update(flat_numbers(row, f"inference/{row['mode']}"))
    for row in result.get("backends", []):
        numbers.update(flat_numbers(row, f"backends/{row['variant']}"))
    for logger in loggers:
        logger.log_hyperparams(result["settings"])
        logger.log_metrics(numbers, step=0)
        if isinstance(logger, LightningWandbLogger):
            for key in ("training", "inference", "backends"):
                if result.get(key):  # a part the benchmark was told to skip has no rows
                    log_rows(logger, key, result[key])
            logger.experiment.summary.update({f"machine/{k}": v for k, v in result["machine"].items()})
            logger.experiment.summary["git_commit"] = git_commit()
        logger.save()
        logger.finalize("success")
