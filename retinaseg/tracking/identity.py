"""What tells a run from the others, from its Hydra job alone: its name (the experiment and the overrides that say
what it is), its group (its sweep, or its experiment) and those overrides as flat config. No W&B here:
retinaseg.tracking.wandb gives them to the W&B run."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

# Command-line overrides that say where things are or how the run is logged, not what it is: left out of run
# names and of the flat config (a key, or everything under it).
NOISE = ("hydra", "logger", "paths", "data.root", "ckpt_path", "resume", "tags", "hparams_search")


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
