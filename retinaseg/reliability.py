"""Surviving failures: atomic writes, a checkpoint on SIGTERM, a stop on NaN, logs that survive a resume.

Wired in by the configs: `AtomicCheckpointIO` (conf/trainer), the callbacks (conf/callbacks) and
`ResumableCSVLogger` (conf/logger); `resume=<run dir>` (conf/train.yaml) continues a run in place.
"""

import contextlib
import csv
import errno
import io
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from retinaseg.checkpoint import load_checkpoint
from retinaseg.errors import DataError

log = logging.getLogger(__name__)


def why_not_written(error: OSError) -> str:
    return "the disk is full" if error.errno == errno.ENOSPC else error.strerror or str(error)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary file beside it, renamed over it once complete and synced.

    A crash or a full disk midway leaves the previous version of `path` (if any) untouched, never a
    partial file under its name. A write error becomes a DataError naming the file.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        partial.unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError.
        cause = error if isinstance(error, OSError) else error.__context__
        if not isinstance(cause, OSError):
            raise
        raise DataError(
            f"cannot write {path}: {why_not_written(cause)}. Files written before it are intact; free space (or fix the path) and run again."
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written with `write_atomically`, so `last.ckpt` is always a complete checkpoint.

    Lightning's own writer stages the file in the system temp folder and moves it, which is a plain
    (non-atomic) copy when that folder is on another filesystem.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        write_atomically(path, lambda file: torch.save(checkpoint, file))


def last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
        return None
    return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"


class CheckpointOnSigterm(L.Callback):
    """Saves `last.ckpt` when a SIGTERM (a scheduler's notice before pre-emption) stops training.

    Lightning stops at the end of the current batch on SIGTERM; the checkpoint records that batch, and
    the data module's state lets the resumed run continue the epoch with the patches not yet seen.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        path = last_checkpoint_path(trainer)
        if isinstance(exception, SIGTERMException) and path is not None:
            trainer.save_checkpoint(path)


class StopOnNonFiniteLoss(L.Callback):
    """Stops training at the first NaN or infinite training loss, naming the step.

    Weights are checked again before each checkpoint is written, so the checkpoints on disk stay the
    last good ones.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Before backward, so the optimizer never steps on it.
        if not torch.isfinite(loss).all():
            batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
            self._stop(
                trainer,
                f"the training loss is {loss.item()} at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch})",
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        bad = next((name for name, p in pl_module.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            self._stop(
                trainer, f"weight {bad} is not finite at step {trainer.global_step} (epoch {trainer.current_epoch})"
            )

    @staticmethod
    def _stop(trainer: L.Trainer, what: str) -> None:
        last = last_checkpoint_path(trainer)
        kept = (
            f"the last good checkpoint is {last}"
            if last is not None and last.is_file()
            else "no checkpoint was written before it"
        )
        raise DataError(
            f"{what}: training stopped; {kept}. Lower model.lr, use trainer.precision=32-true, or check the input data."
        )


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but it keeps an existing metrics.csv (and its columns) to append to,
    and reports a failed write (a full disk) as a DataError."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = csv.DictReader(file).fieldnames or []

    def save(self) -> None:
        try:
            super().save()
        except OSError as error:
            # Dropped, or Lightning's shutdown would try to write them again and fail the same way.
            self.metrics = []
            raise DataError(
                f"cannot write {self.metrics_file_path}: {why_not_written(error)}. The checkpoints written so far are intact; free space and resume the run."
            ) from None


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that appends to the run's metrics.csv when a run is resumed in its own directory.

    Lightning's deletes an existing metrics.csv. Rows logged after the checkpoint a run resumes from
    are dropped by `TrimLogsOnResume`, as the resumed run logs those steps again.
    """

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class TrimLogsOnResume(L.Callback):
    """On resume, removes the CSV rows of steps after the checkpoint: logged before the interruption,
    they would otherwise appear twice once the resumed run logs them again."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Testing the best checkpoint loads it too; only a resumed fit logs those steps again.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                drop_rows_from(Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE, checkpoint["global_step"])


def drop_rows_from(path: Path, step: int) -> None:
    """Drop the rows of CSV log `path` from `step` on: those a run resumed at that step logs again."""
    if not path.is_file():
        return
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if int(r["step"]) < step]
    if len(kept) < len(rows):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        write_atomically(path, lambda file: file.write(text.getvalue().encode()))


def checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint a run continues from: `ckpt_path`, or with `resume=<run dir>` its last.ckpt.

    A run directory that already holds a run is only ever continued, never trained over anew.
    """
    checkpoints = output_dir / "checkpoints"  # where conf/callbacks/default.yaml saves them
    ckpt_path = cfg.get("ckpt_path") or (str(checkpoints / "last.ckpt") if cfg.get("resume") else None)
    if not cfg.get("ckpt_path") and ckpt_path and not Path(ckpt_path).is_file():
        raise DataError(
            f"resume={cfg.resume}: nothing to resume, {ckpt_path} does not exist (a run writes it at the end of "
            "its first epoch). Pass the directory of a run that has one, or start a new run without resume."
        )
    if ckpt_path:
        check_same_model(cfg, ckpt_path)
    continuing = ckpt_path is not None and Path(ckpt_path).resolve().parent == checkpoints.resolve()
    earlier = sorted(checkpoints.glob("*.ckpt")) + [
        p for p in (output_dir / "csv" / "metrics.csv", output_dir / "metrics.json") if p.is_file()
    ]
    if earlier and not continuing:
        raise DataError(
            f"run directory {output_dir} already holds a run ({earlier[0]}); it is not overwritten. Continue it "
            f"with resume={output_dir}, or choose another hydra.run.dir (the default makes a new one)."
        )
    return ckpt_path


def check_same_model(cfg: DictConfig, ckpt_path: str) -> None:
    """A checkpoint continues only the model it was saved from (else loading fails with a wall of size
    mismatches, or a changed setting such as model.lr is silently replaced by the checkpoint's)."""
    saved = load_checkpoint(ckpt_path).hyper_parameters  # a clear error for a missing or damaged file
    model = OmegaConf.to_container(cfg.model, resolve=True)
    differ = [f"model.{k}={saved[k]} (this run: {v})" for k, v in model.items() if k in saved and saved[k] != v]
    if differ:
        raise DataError(
            f"{ckpt_path} was saved with {', '.join(differ)}. Pass the overrides of the run that wrote it "
            "(its .hydra/overrides.yaml) when resuming."
        )


class RefuseUsedRunDir(HydraCallback):
    """Refuses a `hydra.run.dir` that holds a run (unless resuming it) before Hydra writes its .hydra/
    and train.log there, so not even the earlier run's record of its config is overwritten."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            checkpoint_to_resume(config, Path(config.hydra.run.dir))
        except DataError as error:
            sys.exit(f"error: {error}")


@contextlib.contextmanager
def exit_on_sigterm(output_dir: str):
    """Turn Lightning's stop on SIGTERM (a SystemExit with status 0) into a message and status 143."""
    try:
        yield
    except SIGTERMException:
        log.error(
            "stopped by SIGTERM; last.ckpt saved: continue with `python -m retinaseg.train resume=%s`", output_dir
        )
        sys.exit(128 + signal.SIGTERM)


def resume_or(resume: str | None, new_run_dir: str) -> str:
    """`hydra.run.dir`: the run being resumed (`resume=<run dir>`), else a new directory."""
    return str(resume) if resume else new_run_dir


if not OmegaConf.has_resolver("resume_or"):
    OmegaConf.register_new_resolver("resume_or", resume_or)
