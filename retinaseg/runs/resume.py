"""Which checkpoint a training continues from, and the settings it must keep.

`resume=<run dir>` continues that run in its own directory from its last.ckpt; `ckpt_path=<file>` continues
from a checkpoint in a new run directory. Either way the checkpoint is read once, here, and a continued run
must keep every `model.*` and `data.*` setting that changes what the run means (the data, its split, the
patches and batches, the model, its loss and optimizer), unless `resume_allow_changes=true`.
"""

import logging
import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from retinaseg.core.errors import ConfigError, DataError, check_bool
from retinaseg.model.checkpoint import Checkpoint, load_checkpoint
from retinaseg.runs.rundir import RunDir

log = logging.getLogger(__name__)

# Settings a continued run may change freely: they change how fast it runs, not what it computes.
FREE = {"data.num_workers", "data.eval_batch_size", "model.compile", "model.channels_last"}
# The model's shape: the checkpoint's weights fit no other, whatever the user allows.
SHAPE = {"model.in_channels", "model.base_channels", "model.depth"}


@dataclass(frozen=True)
class Start:
    """How a training starts: anew (`checkpoint` None), or continuing `checkpoint`."""

    checkpoint: Checkpoint | None = None

    @property
    def ckpt_path(self) -> str | None:
        """What `Trainer.fit(ckpt_path=...)` restores (Lightning reads the file again for the loop states)."""
        return None if self.checkpoint is None else str(self.checkpoint.path)


def plan_start(cfg: DictConfig, run_dir: RunDir) -> Start:
    """The start of the training `cfg` describes in `run_dir`; the checkpoint it continues from is read once here."""
    allow_changes = check_bool("resume_allow_changes", cfg.get("resume_allow_changes", False))
    if cfg.get("resume") and cfg.get("ckpt_path"):
        raise ConfigError(
            f"resume={cfg.resume} and ckpt_path={cfg.ckpt_path} both say where to continue from: pass one of them."
        )
    if cfg.get("resume"):
        if os.path.realpath(cfg.resume) != os.path.realpath(run_dir.path):
            raise ConfigError(
                f"resume={cfg.resume} continues that run in its own directory, but hydra.run.dir={run_dir.path}: "
                "leave out hydra.run.dir, or use ckpt_path=<file> to continue from a checkpoint in a new directory."
            )
        what, path = f"resume={cfg.resume}", run_dir.last_to_resume()
    elif cfg.get("ckpt_path"):
        what, path = f"ckpt_path={cfg.ckpt_path}", cfg.ckpt_path
    else:
        return Start()
    checkpoint = load_checkpoint(path)
    if not checkpoint.resumable:
        raise DataError(
            f"{what}: {checkpoint.path} holds a model's weights only, without the optimizer and loop state training "
            "continues from. Use it with retinaseg.eval or retinaseg.predict, or continue from a last.ckpt or "
            "best.ckpt that `python -m retinaseg.train` wrote."
        )
    check_same_settings(cfg, checkpoint, what, allow_changes)
    return Start(checkpoint)


def changed_settings(cfg: DictConfig, checkpoint: Checkpoint) -> list[tuple[str, object, object]]:
    """(setting, value saved in the checkpoint, value now) of each model.* and data.* setting that differs."""
    saved = {"model": checkpoint.hyper_parameters, "data": checkpoint.data}
    changed = []
    for group in ("model", "data"):
        now = OmegaConf.to_container(cfg[group], resolve=True)
        for key, value in now.items():
            name = f"{group}.{key}"
            if key == "_target_" or name in FREE or key not in saved[group]:
                continue  # a setting newer than the checkpoint cannot be compared
            if not _same(key, saved[group][key], value):
                changed.append((name, saved[group][key], value))
    return changed


def _same(key: str, saved, now) -> bool:
    if key == "root" and saved and now:  # the same dataset, however its path is written
        return os.path.realpath(os.path.expanduser(str(saved))) == os.path.realpath(os.path.expanduser(str(now)))
    return saved == now


def check_same_settings(cfg: DictConfig, checkpoint: Checkpoint, what: str, allow_changes: bool) -> None:
    """Refuse a continued run whose settings differ from the checkpoint's, naming each; with
    resume_allow_changes=true only the model's shape must match (the weights fit no other)."""
    changed = changed_settings(cfg, checkpoint)
    if not changed:
        return
    listed = ", ".join(f"{name}={saved} (this run: {now})" for name, saved, now in changed)
    shape = [name for name, _, _ in changed if name in SHAPE]
    if shape:
        raise ConfigError(
            f"{what}: its checkpoint was saved with {listed}; its weights fit only the model it was saved from "
            f"({', '.join(shape)} must match). Pass the overrides of the run that wrote it (its .hydra/overrides.yaml)."
        )
    if not allow_changes:
        raise ConfigError(
            f"{what}: its checkpoint was saved with {listed}. Pass the overrides of the run that wrote it (its "
            ".hydra/overrides.yaml), or add resume_allow_changes=true to continue with the new values."
        )
    log.warning(
        "%s: continuing with settings changed since the checkpoint (resume_allow_changes=true): %s", what, listed
    )
