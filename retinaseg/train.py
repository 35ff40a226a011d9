"""`python -m retinaseg.train [overrides]`: compose conf/train.yaml, fit, then test the best checkpoint."""

import contextlib
import json
import logging
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from retinaseg import precision  # noqa: F401  (registers the ${fastest_precision:} resolver)
from retinaseg.errors import exit_on_user_error
from retinaseg.metrics import reported
from retinaseg.reliability import checkpoint_to_resume, exit_on_sigterm, write_atomically
from retinaseg.sweeps import in_multirun, relaunch_ranks_as_this_job
from retinaseg.tracking import finishing_wandb_run, start_tracking

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None, **extra: dict) -> list:
    """Objects of a config group whose entries are each a `_target_` (callbacks, loggers); `extra[<entry>]`: more
    arguments for that entry."""
    return [
        hydra.utils.instantiate(c, **extra.get(name, {}), _convert_="all")
        for name, c in (group or {}).items()
        if c and "_target_" in c
    ]


def train(cfg: DictConfig) -> float | None:
    """Fit and test as configured; return the value of `cfg.optimized_metric` for sweepers."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = checkpoint_to_resume(cfg, output_dir)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger"))
    )
    parameters = sum(p.numel() for p in model.parameters())
    log.info("U-Net with %s parameters; run directory %s", f"{parameters:,}", output_dir)
    start_tracking(trainer.loggers, cfg, parameters, ckpt_path)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
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

    if cfg.get("test"):
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if not best:
            log.warning("no best checkpoint was saved; testing the weights at the end of training")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics = {**reported(trainer.callback_metrics, prefix="test/"), "checkpoint": best or None}
        if trainer.is_global_zero:  # every DDP process holds the same (synced) metrics
            write_atomically(
                output_dir / "metrics.json", lambda file: file.write((json.dumps(metrics, indent=2) + "\n").encode())
            )
            log.info("test metrics of %s: %s", best or "the final weights", json.dumps(metrics))
    return value


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    relaunch_ranks_as_this_job()
    # In a sweep a failing job is left to Hydra, which records it and goes on (retinaseg.sweeps reports it).
    with (
        contextlib.nullcontext() if in_multirun() else exit_on_user_error(),
        exit_on_sigterm(cfg.paths.output_dir),
        finishing_wandb_run(),
    ):
        return train(cfg)


if __name__ == "__main__":
    main()
