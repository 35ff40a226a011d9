"""Lightning callbacks that log to W&B (wired in by conf/callbacks/default.yaml); each does nothing without a W&B
logger.

- `WandbPredictionImages`: validation images with their true and predicted vessels, each validation epoch;
- `WandbSummary`: what ranks and describes a training run in its summary;
- `KeepWandbRun`: the W&B run's id and group in every checkpoint (a continued training logs to the same run).
"""

import math
import time

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from retinaseg.core.machine import run_facts
from retinaseg.evaluation.plots import displayable
from retinaseg.model.checkpoint import WANDB_GROUP_KEY, WANDB_RUN_ID_KEY
from retinaseg.tracking.wandb import vessel_masks, wandb_loggers


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


class KeepWandbRun(L.Callback):
    """Stores the id and group of the run's W&B run in every checkpoint: a training continued from one logs to the
    same W&B run (`start_tracking` of retinaseg.tracking.wandb), an evaluation joins its group (retinaseg.eval). Does
    nothing without a W&B logger."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, LightningWandbLogger)), None)
        if logger is not None and logger.version is not None:
            checkpoint[WANDB_RUN_ID_KEY] = logger.version
            if trainer.is_global_zero:  # other DDP processes hold no W&B run (and save no file)
                checkpoint[WANDB_GROUP_KEY] = logger.experiment.group or None
