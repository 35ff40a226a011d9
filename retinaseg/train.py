"""`python -m retinaseg.train [overrides]`: compose conf/train.yaml, fit, then test the best checkpoint."""

import contextlib
import dataclasses
import json
import logging
import sys
import time

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, check_bool, check_int, exit_on_user_error, user_error_of
from retinaseg.core.safe_io import write_text
from retinaseg.data.sample import fov_source
from retinaseg.model.metrics import reported
from retinaseg.runs.budget import budget_steps, refuse_trainer_budget
from retinaseg.runs.callbacks import RecordSteps, exit_on_sigterm
from retinaseg.runs.resume import plan_start
from retinaseg.runs.rundir import RunDir
from retinaseg.runs.sweeps import in_multirun, relaunch_ranks_as_this_job
from retinaseg.tracking.wandb import finishing_wandb_run, start_tracking

config.setup()
log = logging.getLogger(__name__)


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Trainer of conf/trainer with the configured callbacks and loggers; a trainer setting Lightning
    refuses is reported as a ConfigError with Lightning's reason."""
    max_epochs = cfg.trainer.get("max_epochs")
    if not (max_epochs is None or max_epochs == -1 or (type(max_epochs) is int and max_epochs >= 1)):
        raise ConfigError(
            f"trainer.max_epochs must be an integer >= 1, or -1 for no limit (then set trainer.max_time or "
            f"trainer.max_steps); got {max_epochs!r}"
        )
    callbacks, loggers = config.instantiate_group(cfg.get("callbacks")), config.instantiate_group(cfg.get("logger"))
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    try:
        return hydra.utils.instantiate(settings, callbacks=callbacks, logger=loggers)
    except InstantiationException as error:
        cause = error.__cause__
        if user_error_of(error) is None and isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise ConfigError(f"a trainer.* setting is refused by Lightning: {cause}") from None
        raise


def on_command_line(key: str) -> bool:
    """Whether the Hydra job's command line sets `key` (`trainer.max_time=...`); False outside a Hydra app."""
    if not HydraConfig.initialized():
        return False
    return any(override.lstrip("+~").split("=", 1)[0] == key for override in HydraConfig.get().overrides.task)


def lift_time_stop(cfg: DictConfig) -> None:
    """With trainer.max_steps given, the run trains exactly those steps on any machine (how a budgeted run is
    rerun): an experiment's trainer.max_time, a stop by wall time, is lifted unless the command line sets it too."""
    max_steps, max_time = cfg.trainer.get("max_steps", -1), cfg.trainer.get("max_time")
    if max_steps is not None and max_steps > 0 and max_time is not None and not on_command_line("trainer.max_time"):
        log.info(
            "trainer.max_steps=%d is given: trainer.max_time=%s is lifted, so that every step is trained "
            "(set trainer.max_time on the command line to keep a time stop)",
            max_steps,
            max_time,
        )
        cfg.trainer.max_time = None


def train(cfg: DictConfig) -> float | None:
    """Fit and test as configured; return the value of `cfg.optimized_metric` for sweepers."""
    started = time.perf_counter()
    seed, test = check_int("seed", cfg.seed), check_bool("test", cfg.get("test", False))
    run_dir = RunDir(cfg.paths.output_dir)
    start = plan_start(cfg, run_dir)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    # Lists the images the run uses (reads none): a missing or misplaced dataset, or a split it cannot make, is
    # reported before Lightning says anything.
    for part in ("train", "test") if test else ("train",):
        datamodule.ids(part)
    L.seed_everything(seed, workers=True)
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    lift_time_stop(cfg)
    if cfg.get("budget") is not None:
        # A budgeted run is counted in optimizer steps; its config (and so the loggers) then holds the steps.
        cfg.trainer.max_steps = budget_steps(cfg, model, datamodule, start.ckpt_path, run_dir, started)
        cfg.trainer.max_epochs = -1
    trainer = build_trainer(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    log.info("U-Net with %s parameters; run directory %s", f"{parameters:,}", run_dir.path)
    start_tracking(trainer.loggers, cfg, parameters, start.checkpoint and start.checkpoint.wandb_run_id)

    trainer.fit(model, datamodule=datamodule, ckpt_path=start.ckpt_path)
    steps = next((c.record for c in trainer.callbacks if isinstance(c, RecordSteps)), None)
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    if (
        checkpoint is not None
        and checkpoint.monitor == cfg.optimized_metric
        and checkpoint.best_model_score is not None
    ):
        value = float(checkpoint.best_model_score)
    else:
        value = (
            float(trainer.callback_metrics[cfg.optimized_metric])
            if cfg.optimized_metric in trainer.callback_metrics
            else None
        )

    if test:
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if not best:
            log.warning("no best checkpoint was saved; testing the weights at the end of training")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics = {
            **reported(trainer.callback_metrics, prefix="test/"),
            "checkpoint": best or None,
            "dataset": datamodule.hparams.dataset,
            "fov": fov_source(datamodule.test_samples),
            "scale": datamodule.preprocessing.scale,
            # How the test ran (eval's metrics.json has the same entry): in the trainer's precision, which may
            # differ from eval's default fp32 (the docs, "Training's test and eval").
            "inference": {**model.inference.to_json(), "backend": "torch", "precision": str(trainer.precision)},
            "tta": False,
        }
        if steps is not None:
            metrics["training"] = {**dataclasses.asdict(steps), "complete": steps.complete}
        if trainer.is_global_zero:  # every DDP process holds the same (synced) metrics
            write_text(run_dir.metrics, json.dumps(metrics, indent=2) + "\n")
            log.info("test metrics of %s: %s", best or "the final weights", json.dumps(metrics))
    return value


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    relaunch_ranks_as_this_job()
    # In a sweep a failing job is left to Hydra, which records it and goes on (retinaseg.runs.sweeps reports it).
    with (
        contextlib.nullcontext() if in_multirun() else exit_on_user_error(),
        exit_on_sigterm(cfg.paths.output_dir),
        finishing_wandb_run(),
    ):
        return train(cfg)


if __name__ == "__main__":
    with exit_on_user_error():
        refuse_trainer_budget(sys.argv[1:])
    main()
