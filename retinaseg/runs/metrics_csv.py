"""A run's `csv/metrics.csv` as a Lightning logger: every logged metric, one row per step and stage.

Unlike Lightning's CSVLogger, which rewrites the file in place when new columns appear (the test metrics
at the end of a run: a full disk then truncates it and earlier rows are lost) and deletes an existing one,
this logger writes the whole file through `write_atomically` at each flush, and continues the file of a
run resumed in its own directory (rows logged after the checkpoint it resumes from are dropped first:
the resumed run logs them again).
"""

import csv
import io

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from retinaseg.core.safe_io import write_text
from retinaseg.runs.rundir import RunDir


class MetricsCSVLogger(Logger):
    """Writes `<run_dir>/csv/metrics.csv`, flushed every `flush_logs_every_n_steps` logged steps and at the end.

    Columns are sorted, with `step` (and `epoch`, as Lightning logs it); a row leaves empty the metrics
    not logged at its step. Hyperparameters are not written here: the run's config is in .hydra/ and in
    every checkpoint.
    """

    def __init__(self, run_dir: str, flush_logs_every_n_steps: int = 1):
        super().__init__()
        self.path = RunDir(run_dir).metrics_csv
        self.flush_every = flush_logs_every_n_steps
        self._rows: list[dict] | None = None  # the file's rows, read on first use
        self._unsaved = False

    @property
    def name(self) -> str:
        return self.path.parent.name

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent.parent)

    @property
    def log_dir(self) -> str:
        return str(self.path.parent)

    def rows(self) -> list[dict]:
        """Every row, those of the file this run continues included (values read back as text)."""
        if self._rows is None:
            self._rows = []
            if self.path.is_file():
                with open(self.path, newline="") as file:
                    self._rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]
        return self._rows

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        rows = self.rows()
        row = {key: value.item() if isinstance(value, torch.Tensor) else value for key, value in metrics.items()}
        row["step"] = len(rows) if step is None else step
        rows.append(row)
        self._unsaved = True
        if (row["step"] + 1) % self.flush_every == 0:
            self.save()

    @rank_zero_only
    def drop_rows_from(self, step: int) -> None:
        """Drop the rows from `step` on: those a run resumed at that step logs again."""
        rows = self.rows()
        kept = [row for row in rows if int(float(row["step"])) < step]
        if len(kept) < len(rows):
            self._rows = kept
            self._unsaved = True
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self._unsaved:
            return
        rows = self.rows()
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
        # Marked saved first: after a failed write (a full disk) Lightning's shutdown would try again and fail the same way.
        self._unsaved = False
        write_text(self.path, text.getvalue())

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
