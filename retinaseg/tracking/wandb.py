"""Weights & Biases runs: the mode (online only with an API key, offline otherwise or when the server is out of
reach: W&B never hangs without network), the logger, a run's start (the composed config, continuing the W&B run of
the checkpoint a training continues from) and finish, and the training run's model artifact as an evaluation's
input.

Wired in by conf/logger/wandb.yaml (`WandbLogger`); retinaseg.train calls `start_tracking` once the loggers exist,
and every entry point that logs runs each job inside `finishing_wandb_run`.
"""

import contextlib
import logging
import sys
from collections.abc import Sequence

import numpy as np
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from retinaseg.core.machine import git_commit
from retinaseg.tracking.identity import hydra_identity

log = logging.getLogger(__name__)

# Modes in which a run talks to no server.
LOCAL_MODES = ("offline", "dryrun", "disabled")


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


def start_tracking(loggers: list[Logger], cfg: DictConfig, parameters: int, wandb_run_id: str | None) -> None:
    """Give every logger the composed config, the parameter count and the git commit; a W&B logger continues
    the W&B run `wandb_run_id` (that of the checkpoint the training continues from), where there is one."""
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


def use_training_artifact(logger: LightningWandbLogger, training_run_id: str | None) -> None:
    """Declare the best-checkpoint model artifact of the W&B run `training_run_id` (Lightning's `model-<id>`,
    alias `best`) as the input of `logger`'s run. Online runs only: offline nothing is looked up."""
    if training_run_id is None or logger.experiment.settings.mode in LOCAL_MODES:
        return
    try:
        logger.use_artifact(f"model-{training_run_id}:best", artifact_type="model")
    except Exception as error:  # wandb's CommError and others: not uploaded (an offline training), other project
        log.warning("the model artifact of W&B run %s is not declared as input: %s", training_run_id, error)


MASK_CLASSES = {0: "background", 1: "vessel"}


def vessel_masks(label: np.ndarray, predicted: np.ndarray) -> dict:
    """W&B image masks (drawn over the image, toggled in its panel): the true and the predicted vessels."""
    return {
        "prediction": {"mask_data": predicted.astype(np.uint8), "class_labels": MASK_CLASSES},
        "ground_truth": {"mask_data": label.astype(np.uint8), "class_labels": MASK_CLASSES},
    }
