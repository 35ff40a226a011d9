"""A wall-time budget for training (`budget`, a top-level setting): measure this machine, then train for the steps that fit.

At the start of a run, a throwaway copy of the model takes a few real training steps (timed after a warm-up),
one validation pass and one checkpoint save on this machine. From these, `plan` fixes the number of optimizer
steps (a whole number of epochs of patches, so that the last step is followed by a validation) such that
training, its validations and the final test end inside the budget. The copy, its optimizer and the random
number generators' states are thrown away afterwards: the run itself is exactly the run that
`trainer.max_steps=<the planned steps>` gives on any machine. The plan is logged and written to the run
directory's `budget.json`, which a resumed run (`resume=` or `ckpt_path=`) reads instead of measuring again.
"""

import contextlib
import copy
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from retinaseg.core.errors import ConfigError
from retinaseg.core.safe_io import write_text
from retinaseg.runs.rundir import RunDir

log = logging.getLogger(__name__)

# Share of the budget kept free for what is not measured: Python's start before training, logging, plots,
# and a machine that gets slower after calibration.
MARGIN = 0.05
# What a step of the run may cost beyond a step of the calibration, which has no progress bar, logger or run
# callbacks. Small, because most measured runs ran their steps as fast as calibrated; the runs, and how much
# slower than calibrated a run may be and still end in its budget: docs/experiments/2026-11-28-budget-calibration.md.
RUN_STEP_OVERHEAD = 0.03
# Calibration: untimed warm-up steps, then timed steps until CALIBRATION_SECONDS have passed (at least
# one step, at most CALIBRATION_STEPS).
WARMUP_STEPS = 2
CALIBRATION_STEPS = 50
CALIBRATION_SECONDS = 10.0
# Trainer settings that change what a training step costs; the calibration trainer takes them from the run.
STEP_SETTINGS = (
    "accelerator",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "deterministic",
)


def refuse_trainer_budget(overrides: Sequence[str]) -> None:
    """Refuse `trainer.budget=...` among the command line's `overrides`, naming the key that replaced it: the
    budget is not a Trainer argument, and Hydra alone would only say that the trainer group has no such key."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "trainer.budget":
            raise ConfigError(f"trainer.budget is now the top-level key budget: pass budget={value or '<duration>'}")


def seconds(duration) -> float:
    """A duration as trainer.max_time writes it ("DD:HH:MM:SS"; shorter forms "HH:MM:SS", "MM:SS" too), or
    a number of seconds, in seconds."""
    if isinstance(duration, (int, float)) and not isinstance(duration, bool):
        value = float(duration)
    else:
        try:
            fields = [float(field) for field in str(duration).split(":")]
        except ValueError:
            fields = []
        if not 1 <= len(fields) <= 4 or any(not field >= 0 for field in fields) or str(duration).startswith("-"):
            raise ConfigError(
                f"budget={duration!r} is not a duration: write DD:HH:MM:SS (e.g. 00:00:15:00) or seconds."
            )
        value = sum(field * unit for field, unit in zip(reversed(fields), (1, 60, 3600, 86400)))
    if not value > 0:
        raise ConfigError(f"budget={duration!r} must be a positive duration.")
    return value


@dataclass(frozen=True)
class Calibration:
    """Seconds measured on this machine at the start of a run."""

    step_s: float  # one optimizer step, its data included (mean of the timed steps after the warm-up)
    # What the run's first steps cost beyond step_s each (allocations, kernel choice); with model.compile, measured
    # with the compiled code cached by the calibration, which spent the compile time itself (in elapsed_s).
    warmup_s: float
    validation_s: float  # one validation pass over the validation images
    checkpoint_s: float  # writing one checkpoint (the run writes best.ckpt and last.ckpt each epoch)
    test_s: float  # the final test: validation's seconds per image times the test images (0 without a test)
    sanity_s: float  # Lightning's sanity check: validation's seconds per batch times its batches
    elapsed_s: float  # since the run started, calibration included


@dataclass(frozen=True)
class Plan:
    """How a budget is spent: `epochs` epochs of `steps_per_epoch` optimizer steps each."""

    budget_s: float
    max_steps: int
    epochs: int
    steps_per_epoch: int
    expected_s: float  # what the calibration predicts for the whole run, test included
    calibration: Calibration


def plan(budget_s: float, calibration: Calibration, steps_per_epoch: int) -> Plan:
    """The most whole epochs whose steps, validations and checkpoints, after what is already spent and
    before the final test, fit in the budget less its margin."""
    c = calibration
    fixed = c.elapsed_s + c.warmup_s + c.sanity_s + c.test_s
    per_epoch = steps_per_epoch * c.step_s * (1 + RUN_STEP_OVERHEAD) + c.validation_s + 2 * c.checkpoint_s
    epochs = math.floor((budget_s * (1 - MARGIN) - fixed) / per_epoch)
    if epochs < 1:
        raise ConfigError(
            f"budget of {budget_s:.0f} s leaves no time for one epoch on this machine: setup and calibration "
            f"took {c.elapsed_s:.0f} s, an epoch takes {per_epoch:.3g} s ({steps_per_epoch} steps of {c.step_s:.3g} s, "
            f"validation {c.validation_s:.3g} s) and the test {c.test_s:.3g} s. Raise budget, lower "
            "data.patches_per_epoch, or use a smaller model."
        )
    return Plan(budget_s, epochs * steps_per_epoch, epochs, steps_per_epoch, fixed + epochs * per_epoch, c)


class StepTimer(L.Callback):
    """Times the training steps after `warmup_steps` warm-up steps (`step_s`), and what the warm-up cost beyond
    that (`warmup_s`); stops training once `seconds` have been timed (never, for None)."""

    def __init__(self, warmup_steps: int, seconds: float | None = None):
        self.warmup_steps, self.seconds = warmup_steps, seconds
        self.first: float | None = None
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0
        # Of the timed seconds, those between a step's end and the next one's start: mostly fetching the batch.
        self.waiting_s = 0.0
        self.batch_end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        if self.start is None and trainer.global_step == self.warmup_steps:
            self.start = now
        elif self.start is not None and self.batch_end is not None:
            self.waiting_s += now - self.batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch_end = time.perf_counter()
        if self.start is not None and self.seconds is not None and time.perf_counter() - self.start >= self.seconds:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup_steps

    @property
    def step_s(self) -> float:
        return (self.end - self.start) / self.steps

    @property
    def warmup_s(self) -> float:
        """What the warm-up steps took beyond `step_s` each."""
        return max(0.0, self.start - self.first - self.warmup_steps * self.step_s)


def timing_trainer(timer: StepTimer, max_steps: int, **settings) -> L.Trainer:
    """A bare one-device Trainer that trains `max_steps` steps under `timer`: no logger, checkpoints, progress bar,
    model summary or sanity check (calibration and benchmark time training steps alone). `settings`: more
    Trainer arguments (precision, ...)."""
    return L.Trainer(
        **settings,
        devices=1,
        max_steps=max_steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


@contextlib.contextmanager
def preserved_rng():
    """Restores the states of Python's, NumPy's and torch's random number generators on exit, so that what
    runs inside draws nothing from the run's random streams (data loaders seed themselves from torch's)."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def calibrate(
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    step_settings: dict,
    sanity_batches: int,
    test: bool,
    started: float,
) -> Calibration:
    """Time training steps, a validation pass and a checkpoint save of a throwaway copy of `model` on
    `datamodule`'s data, under a Trainer with the run's `step_settings`. `sanity_batches` is the run's
    trainer.num_sanity_val_steps, `test` whether it tests, `started` its start (time.perf_counter())."""
    datamodule.setup("fit")
    val_loader = datamodule.val_dataloader()
    if test:
        datamodule.setup("test")
    test_images = len(datamodule.test_dataloader().dataset) if test else 0
    timer = StepTimer(WARMUP_STEPS, CALIBRATION_SECONDS)
    with preserved_rng(), tempfile.TemporaryDirectory() as scratch:
        copied = copy.deepcopy(model)
        trainer = timing_trainer(timer, WARMUP_STEPS + CALIBRATION_STEPS, default_root_dir=scratch, **step_settings)
        trainer.fit(copied, train_dataloaders=datamodule.train_dataloader())
        validation_s = timed(lambda: trainer.validate(copied, dataloaders=val_loader, verbose=False))
        warmup_s = timer.warmup_s
        if getattr(copied, "compiled", False):
            # The compilation (in the steps' warm-up and the first validation) is spent here, in elapsed_s: the
            # run's module reuses the compiled code. Time what the run pays: a validation and the warm-up of a
            # fresh copy with that code cached.
            validation_s = timed(lambda: trainer.validate(copied, dataloaders=val_loader, verbose=False))
            again = StepTimer(WARMUP_STEPS)
            fresh = timing_trainer(again, WARMUP_STEPS + 1, default_root_dir=scratch, **step_settings)
            fresh.fit(copy.deepcopy(model), train_dataloaders=datamodule.train_dataloader())
            warmup_s = max(0.0, again.start - again.first - WARMUP_STEPS * timer.step_s)
        start = time.perf_counter()
        trainer.save_checkpoint(Path(scratch) / "calibration.ckpt")
        checkpoint_s = time.perf_counter() - start
    per_batch = validation_s / max(1, len(val_loader))
    return Calibration(
        step_s=timer.step_s,
        warmup_s=warmup_s,
        validation_s=validation_s,
        checkpoint_s=checkpoint_s,
        test_s=validation_s / max(1, len(val_loader.dataset)) * test_images,
        sanity_s=per_batch * min(sanity_batches, len(val_loader)),
        elapsed_s=time.perf_counter() - started,
    )


def timed(action) -> float:
    """Seconds that `action()` takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def recorded_steps(ckpt_path: str) -> tuple[int, Path]:
    """The step count recorded by the run whose checkpoint is `ckpt_path` (`<run>/checkpoints/x.ckpt`), and its record."""
    record = RunDir(Path(ckpt_path).resolve().parent.parent).budget
    if not record.is_file():
        raise ConfigError(
            f"budget is set, but the run of {ckpt_path} recorded no step count ({record} is missing): "
            "continue it with trainer.max_steps=<its step count>, or without budget."
        )
    return int(json.loads(record.read_text())["max_steps"]), record


def budget_steps(
    cfg: DictConfig,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None,
    run_dir: RunDir,
    started: float,
) -> int:
    """The optimizer steps a run with `cfg.budget` trains for, recorded in `run_dir`'s budget.json:

    `trainer.max_steps` where it is given (no calibration: how a budgeted run is reproduced); for a run
    continued from `ckpt_path`, the steps its own run recorded; otherwise calibrated on this machine.
    """
    settings = cfg.trainer
    budget_s = seconds(cfg.budget)
    if settings.get("devices", 1) != 1 or settings.get("num_nodes", 1) != 1:
        raise ConfigError(
            "budget calibrates a single-process run; with several devices or nodes set trainer.max_steps instead."
        )
    record: dict = {"budget": str(cfg.budget), "budget_s": budget_s}
    if settings.get("max_steps", -1) > 0:
        steps = int(settings.max_steps)
        log.info("trainer.max_steps=%d is given: budget is not calibrated", steps)
        record.update(max_steps=steps, source="trainer.max_steps")
    elif ckpt_path:
        steps, source = recorded_steps(ckpt_path)
        log.info("continuing a budgeted run: %d steps, as recorded in %s", steps, source)
        record.update(max_steps=steps, source=str(source))
    else:
        step_settings = {k: settings[k] for k in STEP_SETTINGS if k in settings}
        sanity_batches = settings.get("num_sanity_val_steps", 2)
        calibration = calibrate(model, datamodule, step_settings, sanity_batches, bool(cfg.get("test")), started)
        steps_per_epoch = math.ceil(len(datamodule.train_dataloader()) / settings.get("accumulate_grad_batches", 1))
        result = plan(budget_s, calibration, steps_per_epoch)
        steps = result.max_steps
        log.info(
            "budget %s (%.0f s): a step takes %.3g s, validation %.3g s, the test %.3g s on this machine; "
            "training for %d epochs of %d steps, trainer.max_steps=%d (expected %.0f s in all). "
            "Rerun it exactly anywhere with trainer.max_steps=%d.",
            cfg.budget,
            budget_s,
            calibration.step_s,
            calibration.validation_s,
            calibration.test_s,
            result.epochs,
            result.steps_per_epoch,
            steps,
            result.expected_s,
            steps,
        )
        record.update(
            max_steps=steps,
            source="calibration",
            epochs=result.epochs,
            steps_per_epoch=result.steps_per_epoch,
            expected_s=result.expected_s,
            calibration=asdict(calibration),
        )
    record["rerun"] = f"trainer.max_steps={steps}"
    if not (ckpt_path and run_dir.budget.is_file()):  # a run resumed in its own directory keeps its first record
        write_text(run_dir.budget, json.dumps(record, indent=2) + "\n")
    return steps
