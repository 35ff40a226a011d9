"""Weights & Biases: the run's mode, a logger that never hangs without network, what tells runs apart (name, group,
job type, overrides as flat config), a summary that ranks runs, prediction images, evaluations linked to the training
run they score, finishing runs.

Wired in by the configs: `WandbLogger` (conf/logger/wandb.yaml), `WandbPredictionImages` and `WandbSummary`
(conf/callbacks); retinaseg.train calls `start_tracking` once the loggers exist and runs each job inside
`finishing_wandb_run`; retinaseg.eval calls `log_evaluation` and retinaseg.benchmark `log_benchmark`.
"""

import contextlib
import functools
import logging
import math
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from retinaseg.core.machine import cpu_info
from retinaseg.data.sample import Sample
from retinaseg.evaluation.plots import displayable, log_images
from retinaseg.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MASK_CLASSES = {0: "background", 1: "vessel"}
# Modes in which a run talks to no server.
LOCAL_MODES = ("offline", "dryrun", "disabled")
# Command-line overrides that say where things are or how the run is logged, not what it is: left out of run
# names and of the flat config (a key, or everything under it).
NOISE = ("hydra", "logger", "paths", "data.root", "ckpt_path", "resume", "tags", "hparams_search")


def resolve_mode(mode: str | None) -> str:
    """`mode` when set (logger.wandb.mode, by default $WANDB_MODE), else online when an API key is configured
    (WANDB_API_KEY, `wandb login`'s .netrc or W&B's settings file), else offline."""
    if mode:
        return mode
    import wandb

    # Never prompts. Without a key it reads local files only, touching no network; with one, wandb looks up
    # the user name (bounded by its own timeout).
    return "online" if wandb.login(prompt=False, verify=False) else "offline"


@dataclass(frozen=True)
class Override:
    """One command-line override that says what a run is. key: as typed (`model.lr`, `data` for a config group,
    `~callbacks.plots`); short: without its config group (`lr`, `plots`); text: the value as a name shows it; value: typed."""

    key: str
    short: str
    text: str
    value: Any


def run_overrides(overrides: Sequence[str]) -> list[Override]:
    """The overrides of `overrides` (Hydra's `hydra.overrides.task`: the command line, or a sweep job's own) that
    say what a run is, in their order: not those of `NOISE`, nor one whose value is a path (holds a `/`). An
    override given twice counts once, with its last value. Keys are shortened by their config group unless two
    would then read the same; floats are shown with 4 significant digits (an Optuna trial's lr=0.001234)."""
    kept: dict[str, tuple[str, Any, bool]] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if any(key == noise or key.startswith(noise + ".") for noise in NOISE):
            continue
        value = None if override.is_delete() else override.value()
        text = override.input_line.split("=", 1)[1] if "=" in override.input_line else ""
        if isinstance(value, str) and "/" in value:
            continue
        if isinstance(value, float):
            text = f"{value:.4g}"
        kept[key] = (text, value, override.is_delete())
    # A key loses its config group only: `model.lr` -> `lr`, but `model.inference.batch_size` ->
    # `inference.batch_size`, not `batch_size`, which is the data module's (Lightning logs the model's and data
    # module's settings flat under their own names).
    shorts = [key.split(".", 1)[-1] for key in kept]
    result = []
    for key, (text, value, delete) in kept.items():
        short = key.split(".", 1)[-1] if shorts.count(key.split(".", 1)[-1]) == 1 else key
        result.append(Override(f"~{key}" if delete else key, f"~{short}" if delete else short, text, value))
    return result


def run_name(task: str, experiment: str | None, overrides: Sequence[str]) -> str:
    """`<experiment or task> <overrides>`, e.g. `drive_cpu lr=0.001 base_channels=32` (see `run_overrides`)."""
    words = [experiment or task]
    for override in run_overrides(overrides):
        if override.key != "experiment":  # already the first word
            words.append(override.short if override.key.startswith("~") else f"{override.short}={override.text}")
    return " ".join(words)


def flat_params(overrides: Sequence[str], groups: Sequence[str] = ()) -> dict[str, Any]:
    """The run's overrides (see `run_overrides`) as flat config entries by short key, typed (`{"lr": 0.001}`),
    for W&B's parallel-coordinates panel and runs table; the choice of a config group (`data=synthetic`, one of
    `groups`) as `choices/<group>`, since the config's `data` holds the composed settings."""
    return {
        (f"choices/{o.key}" if o.key in groups else o.short): o.value
        for o in run_overrides(overrides)
        if not o.key.startswith("~")
    }


def sweep_group(sweep_dir: str, study_name: str | None = None, storage: str | None = None) -> str:
    """The W&B group of every job of one multirun: an Optuna study kept in a storage by its study name (running
    the command again continues the study, and its group); any other sweep by its directory's name."""
    return study_name if study_name and storage else Path(sweep_dir).name


@dataclass(frozen=True)
class RunIdentity:
    """What tells a W&B run from the others: its name, its group (None: none) and its overrides as flat config."""

    name: str
    group: str | None
    params: dict


def hydra_identity(task: str) -> RunIdentity | None:
    """The identity of the Hydra job this process runs (None outside a Hydra app): named by `run_name`; grouped by
    its sweep in a multirun (`sweep_group`), else by its experiment."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    overrides, choices = list(hydra_cfg.overrides.task), hydra_cfg.runtime.choices
    experiment = choices.get("experiment")
    group = experiment
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweeper = hydra_cfg.sweeper
        group = sweep_group(hydra_cfg.sweep.dir, sweeper.get("study_name"), sweeper.get("storage"))
    return RunIdentity(run_name(task, experiment, overrides), group, flat_params(overrides, list(choices)))


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger whose mode is resolved by `resolve_mode`, and whose online start waits at most
    `init_timeout` seconds for the server: when it fails the run goes on offline, with a warning.

    `job_type`: train, eval or benchmark (the entry point's task_name). `name`: by default `run_name` of the Hydra
    job. `group`: by default `training_group` (an evaluation joins the group of the training run it scores), else
    the job's sweep (every job of a multirun shares one), else its experiment. The job's overrides also go into
    the config, flat (`flat_params`). `log_model` (the best checkpoint as a model artifact at the end of
    training) applies to online runs only. Other arguments are Lightning's WandbLogger's and wandb.init's
    (project, entity, tags, notes, ...).
    """

    def __init__(
        self,
        mode: str | None = None,
        init_timeout: float = 30.0,
        log_model: bool = False,
        job_type: str | None = None,
        name: str | None = None,
        group: str | None = None,
        training_group: str | None = None,
        **kwargs,
    ):
        import wandb

        mode = resolve_mode(mode)
        identity = hydra_identity(job_type or "run")
        if identity is not None:
            name = name or identity.name
            kwargs["config"] = {**identity.params, **(kwargs.get("config") or {})}
        group = group or training_group or (identity.group if identity else None)
        settings = wandb.Settings(init_timeout=init_timeout)
        super().__init__(
            mode=mode,
            settings=settings,
            log_model=log_model and mode == "online",
            name=name,
            group=group,
            job_type=job_type,
            **kwargs,
        )
        # Lightning passes anonymous=None to wandb.init, which only makes wandb warn that it has no effect.
        self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self):
        # `_wandb_init` holds Lightning's arguments for wandb.init, which it calls on first use.
        if self._experiment is None and self._wandb_init.get("mode") == "online":
            try:
                return super().experiment
            except (
                Exception
            ) as error:  # wandb raises CommError, AuthenticationError, ... when the server is out of reach
                log.warning("W&B did not start online (%s); this run is logged offline instead", error)
                self._wandb_init["mode"] = "offline"
        return super().experiment

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # Only a checkpoint chosen by a metric (best.ckpt) makes the model artifact, not the plain last.ckpt.
        if checkpoint_callback.monitor is not None:
            super().after_save_checkpoint(checkpoint_callback)

    def continue_run(self, run_id: str) -> None:
        """Log to the W&B run `run_id` (that of the checkpoint a training continues from)."""
        if self._experiment is None:
            self._id = self._wandb_init["id"] = run_id
            log.info("resuming W&B run %s", run_id)


def wandb_loggers(loggers: Sequence[Logger]) -> list[LightningWandbLogger]:
    return [logger for logger in loggers if isinstance(logger, LightningWandbLogger)]


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


def start_tracking(loggers: list[Logger], cfg: DictConfig, parameters: int, wandb_run_id: str | None) -> None:
    """Give every logger the composed config, the parameter count and the git commit; a W&B logger continues
    the W&B run `wandb_run_id` (that of the checkpoint the training continues from), when there is one."""
    info = {**OmegaConf.to_container(cfg, resolve=True), "parameters": parameters, "git_commit": git_commit()}
    for logger in loggers:
        if wandb_run_id and isinstance(logger, WandbLogger):
            logger.continue_run(wandb_run_id)
        logger.log_hyperparams(info)


@contextlib.contextmanager
def finishing_wandb_run():
    """Finish the W&B run started inside (a failed one too), so that the next job of a multirun starts its own;
    for an offline run, log the command that uploads it."""
    try:
        yield
    except BaseException:
        _finish_wandb_run(exit_code=1)
        raise
    _finish_wandb_run(exit_code=0)


def _finish_wandb_run(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")  # not imported: no run to finish
    run = wandb.run if wandb is not None else None
    if run is None:
        return
    offline, sync_dir = run.settings.mode in ("offline", "dryrun"), run.settings.sync_dir
    run.finish(exit_code=exit_code)
    if offline:
        log.info("W&B run saved offline; upload it with: wandb sync %s", sync_dir)


def vessel_masks(label: np.ndarray, predicted: np.ndarray) -> dict:
    """W&B image masks (drawn over the image, toggled in its panel): the true and the predicted vessels."""
    return {
        "prediction": {"mask_data": predicted.astype(np.uint8), "class_labels": MASK_CLASSES},
        "ground_truth": {"mask_data": label.astype(np.uint8), "class_labels": MASK_CLASSES},
    }


class WandbPredictionImages(L.Callback):
    """Each validation epoch, logs the first `num_images` whole validation images to W&B with their ground-truth
    and predicted vessel masks. Does nothing without a W&B logger."""

    def __init__(self, num_images: int = 4):
        self.num_images = num_images
        self.images: list[dict] = []

    @staticmethod
    def _logger(trainer: L.Trainer) -> LightningWandbLogger | None:
        return next(iter(wandb_loggers(trainer.loggers)), None)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.images = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._logger(trainer) is None:
            return
        for i in range(min(len(outputs["probs"]), self.num_images - len(self.images))):
            predicted = pl_module.predictor.masks(outputs["probs"][i : i + 1], batch["fov"][i : i + 1])[0, 0]
            self.images.append(
                {
                    "image": np.round(displayable(batch["image"][i], batch["label"].shape[-2:]) * 255).astype(np.uint8),
                    "caption": batch["id"][i],
                    "masks": vessel_masks(batch["label"][i, 0].cpu().numpy(), predicted.cpu().numpy()),
                }
            )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        logger = self._logger(trainer)
        if self.images and logger is not None:
            logger.log_image(
                "val/predictions",
                images=[item["image"] for item in self.images],
                step=trainer.global_step,
                caption=[item["caption"] for item in self.images],
                masks=[item["masks"] for item in self.images],
            )
        self.images = []


class WandbSummary(L.Callback):
    """Puts in the W&B run's summary what ranks and describes a training run: the best `monitor` through W&B's
    `define_metric` summary (`mode`: max or min; the runs table ranks by it, not by the last epoch) and the epoch
    it came at (`best_epoch`, counted from 0 as the logged `epoch`); the model's `parameters`, `precision`,
    `device` and the `git_commit`; training throughput `train/patches_per_s` (training batches only, all
    processes); `wall_time_s` from the start of fit to the end of the last fit or test. The `test/*` metrics,
    logged once after fit for the best checkpoint, are the summary's as they stand. Does nothing without a W&B
    logger; the best value and epoch are kept in checkpoints, so a resumed run reports them."""

    def __init__(self, monitor: str = "val/f1", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.start: float | None = None
        self.epoch_start: float | None = None
        self.last_batch_end: float | None = None
        self.train_seconds, self.patches = 0.0, 0

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]

    @staticmethod
    def _run(trainer: L.Trainer):
        logger = next(iter(wandb_loggers(trainer.loggers)), None)
        return logger.experiment if logger is not None and trainer.is_global_zero else None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        run = self._run(trainer)
        if run is None:
            return
        # Lightning plots every metric against trainer/global_step; a definition of its own must say so again.
        run.define_metric(self.monitor, step_metric="trainer/global_step", step_sync=True, summary=self.mode)
        run.summary.update({"precision": trainer.precision, **run_facts(pl_module, trainer.strategy.root_device)})
        if self.best_epoch is not None:  # resumed
            run.summary["best_epoch"] = self.best_epoch

    # An epoch's training time runs from its first batch to the end of its last: validation, which runs before
    # on_train_epoch_end, is left out (and on_train_epoch_start is not called for an epoch resumed midway).
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.epoch_start is None:
            self.epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_batch_end = time.perf_counter()
        # batch_size is per process: every process trains as many patches.
        self.patches += len(batch["image"]) * trainer.world_size

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.epoch_start is None or self.last_batch_end is None:
            return
        self.train_seconds += self.last_batch_end - self.epoch_start
        self.epoch_start = self.last_batch_end = None
        run = self._run(trainer)
        if run is not None and self.train_seconds > 0:
            run.summary["train/patches_per_s"] = self.patches / self.train_seconds

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best, self.best_epoch = value, trainer.current_epoch
            run = self._run(trainer)
            if run is not None:
                run.summary["best_epoch"] = self.best_epoch

    def _wall_time(self, trainer) -> None:
        run = self._run(trainer)
        if run is not None and self.start is not None:
            run.summary["wall_time_s"] = time.perf_counter() - self.start

    def on_fit_end(self, trainer, pl_module) -> None:
        self._wall_time(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._wall_time(trainer)


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


# metrics.json's entries that describe how an evaluation was made, not what it measured.
EVALUATION_SETTINGS = (
    "checkpoint",
    "dataset",
    "split",
    "fov",
    "scale",
    "threshold_from",
    "tta",
    "inference",
    "region",
    "bootstrap",
)


def log_evaluation(
    loggers: Sequence[Logger],
    metrics: dict,
    per_image: list[dict],
    figures: Mapping[str, Path],
    examples: Sequence[Sample],
    probs: Mapping[str, np.ndarray],
    checkpoint: Checkpoint,
    model: torch.nn.Module,
) -> None:
    """An evaluation (metrics.json's content `metrics`, its per-image rows) to the run's loggers, each then closed.

    Every logger gets the settings and the checkpoint's model and data settings as hyperparameters, with the id of
    the W&B run that trained it (`training_run_id`), every number of `metrics` flattened under the split
    (`flat_numbers`: `test/f1`, `test/per_image_mean/f1`, intervals as `test/ci95/f1/lo`) and the `figures`. A W&B
    run also gets the per-image rows as a table (`<split>/per_image`), the `examples` with their true and
    predicted vessels (`<split>/predictions`), `run_facts` in its summary and, online, the training run's best
    model artifact as its input (W&B's lineage: which checkpoint gave these scores).
    """
    split, threshold = metrics["split"], metrics["threshold"]
    settings = {key: metrics[key] for key in EVALUATION_SETTINGS if key in metrics}
    hparams = {
        **settings,
        "training_run_id": checkpoint.wandb_run_id,
        "model": checkpoint.hyper_parameters,
        "data": checkpoint.data,
    }
    numbers = flat_numbers({k: v for k, v in metrics.items() if k not in EVALUATION_SETTINGS}, split)
    for logger in loggers:
        logger.log_hyperparams(hparams)
        logger.log_metrics(numbers, step=0)
        log_images([logger], figures)
        if isinstance(logger, LightningWandbLogger):
            log_rows(logger, f"{split}/per_image", per_image)
            if examples:
                logger.log_image(
                    f"{split}/predictions",
                    images=[s.image for s in examples],
                    caption=[s.id for s in examples],
                    masks=[vessel_masks(s.label, (probs[s.id] > threshold) & s.fov) for s in examples],
                )
            logger.experiment.summary.update(run_facts(model, next(model.parameters()).device))
            use_training_artifact(logger, checkpoint.wandb_run_id)
        logger.save()
        logger.finalize("success")


def log_rows(logger: LightningWandbLogger, key: str, rows: Sequence[Mapping]) -> None:
    """`rows` (dicts, not all with the same keys) as a W&B table: one column per key, in order of appearance."""
    columns = list(dict.fromkeys(column for row in rows for column in row))
    logger.log_table(key, columns, [[row.get(column) for column in columns] for row in rows])


def use_training_artifact(logger: LightningWandbLogger, training_run_id: str | None) -> None:
    """Declare the best-checkpoint model artifact of the W&B run `training_run_id` (Lightning's `model-<id>`,
    alias `best`) as the input of `logger`'s run. Online runs only: offline nothing is looked up."""
    if training_run_id is None or logger.experiment.settings.mode in LOCAL_MODES:
        return
    try:
        logger.use_artifact(f"model-{training_run_id}:best", artifact_type="model")
    except Exception as error:  # wandb's CommError and others: not uploaded (an offline training), other project
        log.warning("the model artifact of W&B run %s is not declared as input: %s", training_run_id, error)


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
