"""An evaluation's directory: the files retinaseg.eval writes there, and the one reader of them (retinaseg.compare,
the literature report and cross-validation read through it).

- metrics.json: the pooled metrics with their intervals, and how they were made (`EvaluationSettings`); written
  last: where it is, the evaluation finished;
- per_image.csv: each image's metrics and the counts they come from (per_image_second_observer.csv: the second
  observer's); histograms.npz: each image's probabilities in fine bins, inside the FOV and outside it. With
  metrics.json every number can be recomputed from them;
- probabilities.npz, predictions/<id>.png (0/255, zero outside the FOV) and plots/.

A training run keeps its test images' counts the same way (per_image.csv and histograms.npz, no metrics.json of
this kind): what a cross-validation sweep pools over its folds (retinaseg.runs.sweeps). Each file is written to a
temporary name and renamed: a full disk never leaves a partial file under a real name.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinaseg.core.errors import DataError
from retinaseg.core.safe_io import write_atomically, write_png, write_text
from retinaseg.data.sample import Sample
from retinaseg.evaluation.counts import Confusion, Histograms
from retinaseg.evaluation.protocols import ImageHistograms
from retinaseg.evaluation.scoring import ImageCounts, Scores, per_image_rows
from retinaseg.inference.binarise import binarise


@dataclass(frozen=True)
class EvaluationSettings:
    """How an evaluation was made, in metrics.json beside its numbers. An older metrics.json lacks some (None)."""

    threshold: float
    threshold_from: str  # "fixed" or how it was chosen ("validation F1")
    binarisation: dict | None = None  # Binarisation.to_json() and chosen_on_validation_images
    region: str | None = None
    dataset: str | None = None
    split: str | None = None
    n_images: int | None = None
    fov: str | None = None  # how the FOV masks were obtained (retinaseg.data.sample.fov_source)
    scale: float | None = None
    tta: bool | None = None
    inference: dict | None = None  # the inference settings, backend and precision
    checkpoint: str | None = None
    bootstrap: dict | None = None  # resamples, seed, level

    def to_json(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, metrics: dict) -> EvaluationSettings:
        """The settings among metrics.json's entries."""
        return cls(**{f.name: metrics.get(f.name) for f in dataclasses.fields(cls)})


def metrics_json(numbers: dict, settings: EvaluationSettings) -> dict:
    """metrics.json's content: an evaluation's numbers, then how they were made."""
    return {**numbers, **settings.to_json()}


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation directory holds: metrics.json (`metrics`, the settings among them also as `settings`),
    the model's per-image counts with their histograms inside the FOV, the histograms outside it (None for an
    evaluation written before retinaseg recorded them) and the second observer's confusion (None without)."""

    directory: Path
    metrics: dict
    settings: EvaluationSettings
    counts: ImageCounts
    outside: Histograms | None
    observer: Confusion | None

    @property
    def histograms(self) -> ImageHistograms:
        """The histograms inside and outside the FOV, for other papers' protocols (retinaseg.evaluation.protocols)."""
        return ImageHistograms(self.counts.ids, self.counts.histograms, self.outside)


@dataclass(frozen=True)
class EvaluationDirectory:
    """The files of one evaluation directory (see the module's docstring)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def per_image(self) -> Path:
        return self.path / "per_image.csv"

    @property
    def observer_per_image(self) -> Path:
        return self.path / "per_image_second_observer.csv"

    @property
    def histograms(self) -> Path:
        return self.path / "histograms.npz"

    @property
    def probabilities(self) -> Path:
        return self.path / "probabilities.npz"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def write_scores(self, scores: Scores, probs: dict[str, np.ndarray], samples: Sequence[Sample]) -> None:
        """Everything but metrics.json: the per-image rows, the histograms (inside and outside the FOV), the
        probabilities and the binarised predictions."""
        write_rows(self.per_image, scores.rows)
        if scores.observer_rows:
            write_rows(self.observer_per_image, scores.observer_rows)
        inside = scores.counts.histograms
        # The pixels outside the FOV too, in the same bins: papers that score whole images (retinaseg.evaluation.protocols).
        outside = Histograms.of(
            [probs[s.id][~s.fov] for s in samples],
            [s.label[~s.fov] > 0 for s in samples],
            inside.positive.shape[1],
            inside.logit_range,
        )
        self.write_histograms(scores.counts.ids, inside, outside)
        write_atomically(self.probabilities, lambda file: np.savez_compressed(file, **probs))
        for s in samples:
            mask = binarise(probs[s.id], s.fov, scores.binarisation)
            write_png(self.predictions / f"{s.id}.png", mask.astype(np.uint8) * 255)

    def write_counts(self, counts: ImageCounts) -> None:
        """per_image.csv and histograms.npz of `counts` alone (a training run's test images)."""
        write_rows(self.per_image, per_image_rows(counts, counts.per_image()))
        self.write_histograms(counts.ids, counts.histograms)

    def write_histograms(self, ids: Sequence[str], inside: Histograms, outside: Histograms | None = None) -> None:
        arrays = {
            "ids": np.array(ids),
            "positive": inside.positive.astype(np.uint32),  # a count per image fits
            "negative": inside.negative.astype(np.uint32),
            "logit_range": inside.logit_range,
        }
        if outside is not None:
            arrays.update(
                outside_positive=outside.positive.astype(np.uint32), outside_negative=outside.negative.astype(np.uint32)
            )
        write_atomically(self.histograms, lambda file: np.savez_compressed(file, **arrays))

    def write_metrics(self, numbers: dict, settings: EvaluationSettings) -> None:
        """metrics.json (`metrics_json`), written after every other file of the evaluation: where it is, the
        evaluation finished."""
        write_text(self.metrics, json.dumps(metrics_json(numbers, settings), indent=2) + "\n")

    def read(self, name: str) -> Evaluation:
        """The evaluation, checked: files that are missing, damaged, or contradict each other raise a DataError
        naming the argument `name` that gave the directory."""
        if not self.metrics.is_file():
            raise DataError(f"{name}={self.path} holds no metrics.json: pass the run directory of a retinaseg.eval run")
        metrics = self.read_metrics(name)
        settings = EvaluationSettings.from_json(metrics)
        counts, outside = self.read_model_counts(name)
        check_consistent(counts, metrics, settings, name, self.path)
        observer = None
        if self.observer_per_image.is_file():
            rows = read_rows(self.observer_per_image, name)
            observer = Confusion(
                *(column(rows, key, self.observer_per_image, name) for key in ("tp", "fp", "fn", "tn"))
            )
        return Evaluation(self.path, metrics, settings, counts, outside, observer)

    def read_counts(self, name: str) -> ImageCounts:
        """The per-image counts with their histograms (per_image.csv and histograms.npz), checked."""
        return self.read_model_counts(name)[0]

    def read_metrics(self, name: str) -> dict:
        """metrics.json: an object with at least the threshold and how it was chosen."""
        file = self.metrics
        try:
            metrics = json.loads(file.read_text())
        except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise damaged(name, file, f"cannot be read ({error})") from None
        if not isinstance(metrics, dict):
            raise damaged(name, file, f"holds a {type(metrics).__name__}, not an object of metrics")
        if not isinstance(metrics.get("threshold_from"), str) or not is_number(metrics.get("threshold")):
            raise damaged(name, file, "has no threshold and threshold_from")
        return metrics

    def read_model_counts(self, name: str) -> tuple[ImageCounts, Histograms | None]:
        """The model's counts and the histograms outside the FOV (None where not recorded)."""
        rows = read_rows(self.per_image, name) if self.per_image.is_file() else []
        names = ImageCounts.column_names()
        if not self.histograms.is_file() or not rows or not set(names) <= set(rows[0]):
            raise DataError(
                f"{name}={self.path} has no per-image counts (per_image.csv's tp, fp, ... and histograms.npz): it "
                "was written by an older retinaseg.eval; evaluate its checkpoint again"
            )
        ids = [row["id"] for row in rows]
        columns = {key: column(rows, key, self.per_image, name) for key in names}
        inside, outside = read_histograms(self.histograms, name, ids)
        counts = ImageCounts.from_columns(ids, columns, inside)
        c = counts.confusion
        if not (
            np.array_equal(inside.positive.sum(axis=1), c.tp + c.fn)
            and np.array_equal(inside.negative.sum(axis=1), c.fp + c.tn)
        ):
            raise DataError(
                f"{name}={self.path}: histograms.npz and per_image.csv count different pixels: one of them was edited "
                "or comes from another evaluation; evaluate the checkpoint again"
            )
        return counts, outside


def write_rows(path: Path, rows: list[dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, table.getvalue())


def damaged(name: str, file: Path, what: str) -> DataError:
    return DataError(
        f"{name}={file.parent}: {file.name} {what}: it is damaged or was edited; evaluate the checkpoint again"
    )


def read_rows(file: Path, name: str) -> list[dict]:
    """A per-image CSV's rows, each with a value in every column."""
    try:
        with open(file, newline="") as opened:
            rows = list(csv.DictReader(opened))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise damaged(name, file, f"cannot be read ({error})") from None
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise damaged(name, file, f"has {'more' if None in row else 'fewer'} values on line {line} than columns")
    return rows


def column(rows: list[dict], key: str, file: Path, name: str) -> np.ndarray:
    """One column of a per-image CSV's counts: whole numbers, none negative."""
    try:
        values = np.array([int(row[key]) for row in rows], dtype=np.int64)
    except (ValueError, OverflowError) as error:
        raise damaged(name, file, f"has a {key} that is not a whole number ({error})") from None
    if (values < 0).any():
        raise damaged(name, file, f"has a negative {key} (an impossible count)")
    return values


def read_histograms(file: Path, name: str, ids: list[str]) -> tuple[Histograms, Histograms | None]:
    """histograms.npz (never unpickled): one row of non-negative counts per image of per_image.csv, in order,
    inside the FOV and (where recorded) outside it."""
    try:
        with np.load(file, allow_pickle=False) as saved:
            listed = saved["ids"].tolist()
            logit_range = float(saved["logit_range"])
            arrays = [saved["positive"], saved["negative"]]
            if "outside_positive" in saved:
                arrays += [saved["outside_positive"], saved["outside_negative"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError) as error:
        # ValueError: pickled objects (refused) or a damaged array; KeyError: an array missing.
        raise damaged(name, file, f"cannot be read ({error})") from None
    if listed != ids:
        raise DataError(f"{name}={file.parent}: histograms.npz and per_image.csv list different images")
    shape = arrays[0].shape
    shape_ok = len(shape) == 2 and shape[0] == len(ids) and all(a.shape == shape for a in arrays)
    if not shape_ok or not all(np.issubdtype(a.dtype, np.integer) for a in arrays):
        raise damaged(name, file, f"does not hold one row of counts per image of per_image.csv ({len(ids)})")
    arrays = [a.astype(np.int64) for a in arrays]
    if any((a < 0).any() for a in arrays) or not np.isfinite(logit_range) or logit_range <= 0:
        raise damaged(name, file, "holds negative counts or an impossible logit range")
    inside = Histograms(arrays[0], arrays[1], logit_range)
    return inside, Histograms(arrays[2], arrays[3], logit_range) if len(arrays) == 4 else None


def check_consistent(counts: ImageCounts, metrics: dict, settings: EvaluationSettings, name: str, path: Path) -> None:
    """Refuses counts that contradict metrics.json: the metrics recomputed from the counts must be metrics.json's
    (both were written by one evaluation)."""
    if is_number(settings.n_images) and settings.n_images != len(counts.ids):
        raise DataError(
            f"{name}={path}: metrics.json says {settings.n_images} images, per_image.csv has {len(counts.ids)}: one "
            "of them was edited or comes from another evaluation; evaluate the checkpoint again"
        )
    histograms = counts.histograms
    positive, negative = histograms.positive.sum(axis=0), histograms.negative.sum(axis=0)
    # metrics.json's AUC is exact; the histograms' orders wrongly only pairs within one bin, so it may differ by up to
    # half of those pairs (docs/evaluation.md, "Metrics and statistics").
    auc_tolerance = float((positive * negative).sum()) / (2 * max(float(positive.sum()) * float(negative.sum()), 1.0))
    for key, value in counts.total().items():
        written = metrics.get(key)
        tolerance = auc_tolerance + 1e-9 if key == "auc" else 1e-9
        if is_number(written) and not math.isclose(written, value, rel_tol=1e-6, abs_tol=tolerance):
            raise DataError(
                f"{name}={path}: metrics.json says {key} {written:.6g} but the per-image counts give {value:.6g}: one "
                "of them was edited or comes from another evaluation; evaluate the checkpoint again"
            )


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
