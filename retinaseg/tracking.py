"""Weights & Biases: the run's mode, a logger that never hangs without network, prediction images, finishing runs.

Wired in by the configs: `WandbLogger` (conf/logger/wandb.yaml), `WandbPredictionImages` (conf/callbacks);
retinaseg.train calls `start_tracking` once the loggers exist and runs each job inside `finishing_wandb_run`.
"""

import contextlib
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from retinaseg.plots import displayable

log = logging.getLogger(__name__)

# Where a checkpoint keeps the id of the W&B run that wrote it.
RUN_ID_KEY = "wandb_run_id"
MASK_CLASSES = {0: "background", 1: "vessel"}


def resolve_mode(mode: str | None) -> str:
    """`mode` when set (logger.wandb.mode, by default $WANDB_MODE), else online when an API key is configured
    (WANDB_API_KEY, `wandb login`'s .netrc or W&B's settings file), else offline."""
    if mode:
        return mode
    import wandb

    # Never prompts. Without a key it reads local files only, touching no network; with one, wandb looks up
    # the user name (bounded by its own timeout).
    return "online" if wandb.login(prompt=False, verify=False) else "offline"


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger whose mode is resolved by `resolve_mode`, and whose online start waits at most
    `init_timeout` seconds for the server: when it fails the run goes on offline, with a warning.

    `log_model` (the best checkpoint as a model artifact at the end of training) applies to online runs only.
    Other arguments are Lightning's WandbLogger's and wandb.init's (project, entity, group, tags, notes, ...).
    """

    def __init__(self, mode: str | None = None, init_timeout: float = 30.0, log_model: bool = False, **kwargs):
        import wandb

        mode = resolve_mode(mode)
        settings = wandb.Settings(init_timeout=init_timeout)
        super().__init__(mode=mode, settings=settings, log_model=log_model and mode == "online", **kwargs)
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

    def continue_run_of(self, ckpt_path: str) -> None:
        """Log to the W&B run that wrote `ckpt_path` (its id is in the checkpoint), when it has one."""
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        run_id = checkpoint.get(RUN_ID_KEY)
        if run_id and self._experiment is None:
            self._id = self._wandb_init["id"] = run_id
            log.info("resuming W&B run %s", run_id)


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def start_tracking(loggers: list[Logger], cfg: DictConfig, parameters: int, ckpt_path: str | None) -> None:
    """Give every logger the composed config, the parameter count and the git commit; a W&B logger resuming
    from `ckpt_path` continues the W&B run of that checkpoint."""
    info = {**OmegaConf.to_container(cfg, resolve=True), "parameters": parameters, "git_commit": git_commit()}
    for logger in loggers:
        if ckpt_path and isinstance(logger, WandbLogger):
            logger.continue_run_of(ckpt_path)
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


class WandbPredictionImages(L.Callback):
    """Each validation epoch, logs the first `num_images` whole validation images to W&B with their ground-truth
    and predicted vessel masks; stores the W&B run id in checkpoints, so a resumed training continues the run.
    Does nothing without a W&B logger."""

    def __init__(self, num_images: int = 4):
        self.num_images = num_images
        self.images: list[dict] = []

    @staticmethod
    def _logger(trainer: L.Trainer) -> LightningWandbLogger | None:
        return next((logger for logger in trainer.loggers if isinstance(logger, LightningWandbLogger)), None)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.images = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._logger(trainer) is None:
            return
        for i in range(min(len(outputs["probs"]), self.num_images - len(self.images))):
            predicted = (outputs["probs"][i, 0] > pl_module.hparams.threshold) & batch["fov"][i, 0].bool()
            self.images.append(
                {
                    "image": np.round(displayable(batch["image"][i]) * 255).astype(np.uint8),
                    "caption": batch["id"][i],
                    "masks": {
                        "prediction": {"mask_data": predicted.byte().cpu().numpy(), "class_labels": MASK_CLASSES},
                        "ground_truth": {
                            "mask_data": batch["label"][i, 0].byte().cpu().numpy(),
                            "class_labels": MASK_CLASSES,
                        },
                    },
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

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        logger = self._logger(trainer)
        if logger is not None and logger.version is not None:
            checkpoint[RUN_ID_KEY] = logger.version
