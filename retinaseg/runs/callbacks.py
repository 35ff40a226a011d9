"""Lightning callbacks of a training run (wired in by conf/callbacks/default.yaml).

- `RunCheckpoint`: best.ckpt / last.ckpt, still tracked after the run directory was moved;
- `CheckpointOnSigterm` (with `exit_on_sigterm`): last.ckpt when a scheduler's SIGTERM stops training;
- `StopOnNonFiniteLoss`: a clear stop at the first NaN, before broken weights are checkpointed;
- `TrimLogsOnResume`: csv/metrics.csv without the rows a resumed run logs again;
- `PlotsCallback`: the run's figures;
- `CountTestImages`: the test images' counts (per_image.csv, histograms.npz), what a cross-validation sweep pools
  (retinaseg.runs.sweeps);
- `LogProgress`: a progress line in the log where stdout is not a terminal;
- `RecordSteps`: the steps trained against those planned, and what stopped the run short of them.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, Timer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from retinaseg.core.errors import DivergedError
from retinaseg.core.progress import INTERVAL_S, Pace, on_terminal
from retinaseg.evaluation import plots
from retinaseg.evaluation.scoring import ImageCounts, count_images
from retinaseg.runs.metrics_csv import MetricsCSVLogger
from retinaseg.runs.rundir import RunDir

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, which also keeps tracking the best checkpoint of a run directory that was moved
    or copied before it was resumed.

    A checkpoint records the absolute paths of the run's checkpoints. Where they are not under the current
    `dirpath` Lightning drops the tracking, best score included, and the resumed run would save its next
    epoch, however bad, as `best-v1.ckpt` and test it. Recorded paths are taken relative to the directory
    they were in, when the best checkpoint is found at the same place in this run's directory; otherwise
    (a checkpoint continued in a new run directory) Lightning's handling is kept.
    """

    @property
    def state_key(self) -> str:
        # The key of this callback's state in a checkpoint: Lightning's own (`ModelCheckpoint{...}`), so that
        # checkpoints written with Lightning's ModelCheckpoint resume with their tracking, and the other way round.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict) -> None:
        recorded = state_dict.get("dirpath")
        if recorded and self.dirpath and recorded != self.dirpath:
            best = self._moved(state_dict.get("best_model_path"), recorded)
            if best and Path(best).is_file():
                paths = ("best_model_path", "kth_best_model_path", "last_model_path")
                state_dict = {
                    **state_dict,
                    **{key: self._moved(state_dict.get(key), recorded) for key in paths},
                    "best_k_models": {
                        self._moved(path, recorded): score
                        for path, score in state_dict.get("best_k_models", {}).items()
                    },
                    "dirpath": self.dirpath,
                }
        super().load_state_dict(state_dict)

    def _moved(self, path: str | None, recorded: str) -> str | None:
        """`path`, under `recorded`, as the same path under this run's `dirpath`."""
        if not path:
            return path
        try:
            return str(Path(self.dirpath) / Path(path).relative_to(recorded))
        except ValueError:
            return path


class CheckpointOnSigterm(L.Callback):
    """Saves last.ckpt when a SIGTERM (a scheduler's notice before pre-emption) stops training.

    Lightning stops at the end of the current training batch; the checkpoint records that batch, and the
    data module's state lets the resumed run continue the epoch with the patches not yet seen. Nothing is
    saved when the SIGTERM comes during validation (the resumed run would skip the rest of it, so that
    epoch would never be validated) or testing (the model then holds the best weights, not the last): last.ckpt
    stays the one written at the end of the previous epoch, and the resumed run repeats the epoch exactly.
    """

    def __init__(self, run_dir: str):
        self.last = RunDir(run_dir).last

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING and trainer.training:
            trainer.save_checkpoint(self.last)


@contextlib.contextmanager
def exit_on_sigterm(run_dir: str):
    """Turn Lightning's stop on SIGTERM into a message saying how to resume, and exit status 143."""
    try:
        yield
    except SIGTERMException:
        if RunDir(run_dir).last.is_file():
            log.error(
                "stopped by SIGTERM; continue from last.ckpt with "
                "`python -m retinaseg.train <the run's overrides> resume=%s`",
                run_dir,
            )
        else:
            log.error("stopped by SIGTERM before the first checkpoint: nothing to resume, start the run again")
        sys.exit(128 + signal.SIGTERM)


class StopOnNonFiniteLoss(L.Callback):
    """Stops training at the first NaN or infinite training loss, naming the step.

    Weights are checked again before each checkpoint is written, so the checkpoints on disk stay the
    last good ones.
    """

    def __init__(self, run_dir: str):
        self.last = RunDir(run_dir).last

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

    def _stop(self, trainer: L.Trainer, what: str) -> None:
        kept = (
            f"the last good checkpoint is {self.last}" if self.last.is_file() else "no checkpoint was written before it"
        )
        raise DivergedError(
            f"{what}: training stopped; {kept}. Lower model.lr, use trainer.precision=32-true, or check the input data."
        )


class TrimLogsOnResume(L.Callback):
    """On resume, removes the CSV rows of steps after the checkpoint: logged before the interruption,
    they would otherwise appear twice once the resumed run logs them again."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Testing the best checkpoint loads it too; only a resumed fit logs those steps again.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        for logger in trainer.loggers:
            if isinstance(logger, MetricsCSVLogger):
                logger.drop_rows_from(checkpoint["global_step"])


class PlotsCallback(L.Callback):
    """`plots/curves.png` (loss, recall, precision, F1 per epoch) at the end of fit, from the CSV log;
    `plots/predictions.png` (image | label | prediction | errors of the first `num_images` test images)
    at the end of testing, from the probabilities `test_step` returns."""

    def __init__(self, dirpath: str, num_images: int = 4):
        self.dirpath, self.num_images = Path(dirpath), num_images
        self.rows: list[dict] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, MetricsCSVLogger)), None)
        if csv_logger is None:
            log.info("no CSV logger: plots/curves.png is not drawn")
            return
        csv_logger.save()  # flush rows still buffered
        if not csv_logger.path.is_file():
            log.info("nothing was logged: plots/curves.png is not drawn")
            return
        path = plots.training_curves(csv_logger.path, self.dirpath / "curves.png")
        plots.log_images(trainer.loggers, {"plots/curves": path})
        log.info("training curves: %s", path)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        for i in range(len(outputs["probs"])):
            if len(self.rows) == self.num_images:
                return
            self.rows.append(
                {
                    "id": batch["id"][i],
                    "image": batch["image"][i].cpu(),
                    "label": batch["label"][i, 0].cpu().numpy(),
                    "fov": batch["fov"][i, 0].cpu().numpy(),
                    "prob": outputs["probs"][i, 0].float().cpu().numpy(),
                }
            )

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            path = plots.results_grid(self.rows, pl_module.binarisation, self.dirpath / "predictions.png")
            plots.log_images(trainer.loggers, {"plots/predictions": path})
            log.info("test predictions: %s", path)
        self.rows = []


class CountTestImages(L.Callback):
    """Writes the run directory's test counts after testing (`RunDir.test_counts`): each test image's counts of the
    model's binarised mask (retinaseg.inference.binarise) and its probabilities' histograms
    (retinaseg.evaluation.scoring.ImageCounts), in the files an evaluation keeps them in. A
    cross-validation sweep adds up its folds' files to score every image by the model that never saw it, pooled
    over all test pixels (retinaseg.runs.sweeps).

    Under DDP each process counts its share of the images and rank 0 gathers them (an image every process
    tested, when there are fewer images than processes, counts once).
    """

    def __init__(self, run_dir: str):
        self.directory = RunDir(run_dir).test_counts
        self.counts: list[ImageCounts] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counts = []

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        for i, image in enumerate(batch["id"]):
            prob, label, fov = (x[i, 0].float().cpu().numpy() for x in (outputs["probs"], batch["label"], batch["fov"]))
            fov = fov > 0
            self.counts.append(count_images([image], [prob], [label], [fov], pl_module.binarisation, True))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = self.counts
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, counts)
            counts = [c for part in gathered for c in part]
        if trainer.is_global_zero and counts:
            unique: dict[str, ImageCounts] = {}
            for c in counts:
                unique.setdefault(c.ids[0], c)
            pooled = functools.reduce(ImageCounts.concatenate, unique.values())
            self.directory.write_counts(pooled)


class LogProgress(L.Callback):
    """Where stdout is not a terminal (a log file, nohup, a SLURM job), where the progress bar shows nothing until
    an epoch ends, logs a line at least every `interval_s` seconds of training:
    `training: 120/640 steps, 2.1 steps/s, 4:02 left; epoch 3, loss 0.4321` (epochs counted from 0, as logged).
    The time left counts validations at the pace seen so far. `on_terminal`: log these lines on a terminal too."""

    def __init__(self, interval_s: float = INTERVAL_S, on_terminal: bool = False):
        self.interval_s, self.on_terminal = interval_s, on_terminal
        self.pace: Pace | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        active = trainer.is_global_zero and (self.on_terminal or not on_terminal())
        self.pace = Pace(planned_steps(trainer), self.interval_s, trainer.global_step) if active else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.pace is not None and self.pace.due():
            loss = float(outputs["loss"]) if isinstance(outputs, dict) and "loss" in outputs else float("nan")
            progress = self.pace.report(trainer.global_step, "steps")
            log.info("training: %s; epoch %d, loss %.4f", progress, trainer.current_epoch, loss)


@dataclasses.dataclass(frozen=True)
class StepsRecord:
    """How far a training run got: optimizer steps done, those planned (max_steps, or max_epochs' worth), and, for a
    run stopped short of them, why."""

    steps: int
    planned_steps: int | None  # None: no step or epoch limit (trainer.max_time alone ends the run)
    stopped_by: str | None  # None: every planned step was trained

    @property
    def complete(self) -> bool:
        return self.stopped_by is None


class RecordSteps(L.Callback):
    """At the end of training, `record` (a StepsRecord): the steps done against those planned. A run cut short
    (trainer.max_time, early stopping, or another callback's stop) says so in the log, as a warning naming the
    cause, and in the W&B run's summary (`train/steps`, `train/planned_steps`, `train/stopped_by`); retinaseg.train
    writes it into metrics.json."""

    def __init__(self):
        self.planned: int | None = None
        self.record: StepsRecord | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.planned = planned_steps(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = trainer.global_step
        stopped_by = None if self.planned is None or steps >= self.planned else stop_cause(trainer)
        self.record = StepsRecord(steps, self.planned, stopped_by)
        if stopped_by is not None:
            log.warning("training stopped after %d of its %d planned steps: %s", steps, self.planned, stopped_by)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.summary.update(
                    {"train/steps": steps, "train/planned_steps": self.planned, "train/stopped_by": stopped_by}
                )


def planned_steps(trainer: L.Trainer) -> int | None:
    """The optimizer steps a fit is set to train (max_steps, or max_epochs of its batches); None for no limit."""
    planned = trainer.estimated_stepping_batches
    return None if math.isinf(planned) else int(planned)


def stop_cause(trainer: L.Trainer) -> str:
    """Why training ended before its planned steps, as far as Lightning's public callbacks tell."""
    for callback in trainer.callbacks:
        remaining = callback.time_remaining() if isinstance(callback, Timer) else None
        if remaining is not None and remaining <= 0:
            return f"trainer.max_time reached ({callback.time_elapsed():.0f} s of training)"
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
            return f"early stopping on {callback.monitor} at epoch {callback.stopped_epoch}"
    return "a callback stopped training (trainer.should_stop)"
