"""The reference results, one record each (docs/results/records/*.yaml), and the Markdown tables the docs and the
README show of them (`python -m retinaseg.results`)."""

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from retinaseg.core.errors import ConfigError, DataError, check_choice
from retinaseg.core.machine import device_description, git_commit
from retinaseg.evaluation.counts import DISPLAY

ROLES = ("reference", "best", "run")
SCORERS = ("model", "second_observer")
BEGIN, END = "<!-- results:begin (python -m retinaseg.results) -->", "<!-- results:end -->"
# The metrics a table shows, in this order; a record keeps every pooled metric of its evaluation.
SHOWN = ("f1", "auc", "sensitivity", "specificity")
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")


@dataclass
class Record:
    """One result: what was run, on which code and machine, how long it took, and what it scored."""

    name: str
    title: str
    role: str
    date: str
    command: list[str]
    version: str | None
    machine: str
    dataset: str
    split: str
    n_images: int
    threshold: float
    steps: int | None = None
    wall_time_s: int | None = None
    # metric -> [value, low, high] (the 95% bootstrap interval over images)
    metrics: dict[str, list[float]] = field(default_factory=dict)


def load_records(folder: Path) -> list[Record]:
    return [Record(**yaml.safe_load(path.read_text())) for path in sorted(folder.glob("*.yaml"))]


def duration(seconds: int | None) -> str:
    return "–" if seconds is None else f"{seconds // 60}:{seconds % 60:02d}"


def cell(metric: list[float], decimals: int) -> str:
    """The value over its 95% interval (the line break keeps the table narrow on GitHub and in the site)."""
    value, low, high = metric
    return f"{value:.{decimals}f}<br>[{low:.{decimals}f}, {high:.{decimals}f}]"


def table(records: list[Record], roles: tuple[str, ...]) -> str:
    """The Markdown table of the records of these roles: one row each, metrics with their 95% intervals."""
    names = [DISPLAY[key][0] for key in SHOWN]
    lines = [
        "| result | " + " | ".join(names) + " | steps | wall time | machine |",
        "| --- " * (len(SHOWN) + 4) + "|",
    ]
    for record in (r for role in roles for r in records if r.role == role):
        cells = ["–" if key not in record.metrics else cell(record.metrics[key], DISPLAY[key][1]) for key in SHOWN]
        steps = "–" if record.steps is None else str(record.steps)
        lines.append(
            f"| {record.title} | " + " | ".join(cells) + f" | {steps} | {duration(record.wall_time_s)} | "
            f"{record.machine} |"
        )
    return "\n".join(lines) + "\n"


def rendered(page: str, records: list[Record], roles: tuple[str, ...]) -> str:
    """`page` with the text between its BEGIN and END markers replaced by the records' table."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ConfigError(f"the page has no `{BEGIN}` ... `{END}` markers: add them where the table goes")
    return page[: start + len(BEGIN)] + "\n" + table(records, roles) + page[end:]


def log_seconds(log_file: Path) -> int:
    """Seconds from the first to the last timestamped line of a run's log."""
    times = [LOG_TIME.match(line) for line in log_file.read_text().splitlines()]
    times = [datetime.datetime.fromisoformat(t.group(1)) for t in times if t]
    if len(times) < 2:
        raise DataError(f"{log_file} has fewer than two timestamped lines: the run did not finish")
    return round((times[-1] - times[0]).total_seconds())


def command(run_dir: Path, module: str) -> str:
    """The command line of a run, from its .hydra/overrides.yaml."""
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    return " ".join([f"python -m retinaseg.{module}", *overrides])


def record_of(
    eval_dir: Path, name: str, title: str, role: str, scorer: str, version: str | None, machine: str | None
) -> Record:
    """A record of the evaluation in `eval_dir`: the model's scores (and its training run's) or the second
    observer's (`scorer`); `version` and `machine` None: this checkout's commit and this machine."""
    check_choice("role", role, ROLES)
    check_choice("scorer", scorer, SCORERS)
    if not name or not title:
        raise ConfigError("name and title must be set: name=<file name of the record> title='<its row in the table>'")
    if not (eval_dir / "metrics.json").is_file():
        raise DataError(f"eval_dir={eval_dir} holds no metrics.json: pass the run directory of a retinaseg.eval run")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    scores = metrics if scorer == "model" else metrics.get("second_observer")
    if scores is None or "ci95" not in scores:
        raise DataError(
            f"{eval_dir}/metrics.json has no {scorer} scores with 95% intervals: evaluate with bootstrap > 0 "
            "(the default) on a dataset with a second observer"
        )
    record = Record(
        name=name,
        title=title,
        role=role,
        date=datetime.date.today().isoformat(),
        command=[command(eval_dir, "eval")],
        version=version or git_commit(),
        # A human annotator's scores depend on no machine.
        machine=machine or (device_description(torch.device("cpu")) if scorer == "model" else "–"),
        dataset=metrics["dataset"],
        split=metrics["split"],
        n_images=metrics["n_images"],
        threshold=metrics["threshold"] if scorer == "model" else 0.5,
        metrics={key: [scores[key], *scores["ci95"][key]] for key in DISPLAY if key in scores["ci95"]},
    )
    if scorer == "model":
        checkpoint = Path(metrics["checkpoint"])
        run_dir = checkpoint.parent.parent
        if not (checkpoint.is_file() and (run_dir / "train.log").is_file()):
            raise DataError(
                f"{checkpoint} or its run's train.log is gone: the record needs the training run's directory"
            )
        record.command.insert(0, command(run_dir, "train"))
        record.steps = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])
        record.wall_time_s = log_seconds(run_dir / "train.log")
    return record
