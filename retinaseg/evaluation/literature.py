"""A model beside published results, each scored the way its paper or project scored it.

retinaseg/evaluation/published.yaml lists the results with how they were measured (which pixels, pooled or averaged per
image, which threshold); `report` scores an evaluation's histograms under each protocol and threshold policy of
the results on its dataset (retinaseg.evaluation.protocols) and writes literature.md and literature.csv. Thresholds:
- a probability: fixed;
- train / validation: chosen beforehand, maximising F1 under the result's protocol, on the evaluation of the same
  checkpoint's training (split=train) or validation (split=val) images;
- test: chosen on the images scored, which reports how much a threshold tuned on them gains: diagnostic, never a
  result (the report adds one such row);
- binarised: an AUC computed from thresholded predictions, which probabilities cannot reproduce.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from retinaseg.core.errors import ConfigError, DataError
from retinaseg.core.safe_io import write_text
from retinaseg.evaluation import protocols
from retinaseg.evaluation.directory import Evaluation, EvaluationDirectory

POLICIES = ("train", "validation", "test", "binarised")
# Published metrics retinaseg does not compute (listed, not scored).
NOT_COMPUTED = ("auc_pr",)
NAMES = {
    "f1": "F1 (Dice)",
    "auc": "AUC",
    "auc_pr": "AUC-PR",
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision",
    "iou": "IoU",
    "mcc": "MCC",
    "miou": "mIoU (vessel, background)",
    "mdice": "mDice (vessel, background)",
}
REQUIRED = ("id", "source", "model", "dataset", "split", "protocol", "threshold", "metrics")
OPTIONAL = ("params", "training", "notes", "sd", "percent", "pad_to", "second_observer")


@dataclass(frozen=True)
class Published:
    """One published result: its metrics (as fractions) and how they were measured."""

    id: str
    source: str
    model: str
    dataset: str
    split: str
    protocol: protocols.Protocol
    threshold: float | str
    metrics: dict[str, float]
    sd: dict[str, float] = field(default_factory=dict)
    params: str | None = None
    training: str | None = None
    notes: str | None = None
    second_observer: bool = False

    @property
    def threshold_text(self) -> str:
        if isinstance(self.threshold, float):
            return f"fixed {self.threshold:g}"
        return {
            "train": "chosen on training images",
            "validation": "chosen on validation images",
            "test": "chosen on test images",
            "binarised": "AUC of binarised predictions",
        }[self.threshold]

    @property
    def protocol_text(self) -> str:
        p = self.protocol
        region = {"fov": "FOV", "whole_image": "whole image", "fov_multiplied": "prediction x FOV, all pixels"}
        text = f"{region[p.region]}, {'pooled' if p.averaging == 'pooled' else 'mean per image'}"
        return text + (f", zero-padded to {p.pad_to[0]}x{p.pad_to[1]}" if p.pad_to else "")


def parse(entry: dict, where: str) -> Published:
    """An entry of the data file, checked: what makes it unusable raises DataError naming it."""
    name = f"{where}: entry {entry.get('id', '?')}"
    missing = [key for key in REQUIRED if entry.get(key) in (None, "", {})]
    if missing:
        raise DataError(f"{name} lacks {', '.join(missing)}: every published result needs {', '.join(REQUIRED)}")
    unknown = set(entry) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise DataError(f"{name} has unknown keys {', '.join(sorted(unknown))}: use {', '.join(REQUIRED + OPTIONAL)}")
    try:
        protocol = protocols.Protocol.named(entry["protocol"], entry.get("pad_to"))
    except ValueError as error:
        raise DataError(f"{name}: {error}") from None
    threshold = entry["threshold"]
    if isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 < threshold < 1:
        threshold = float(threshold)
    elif threshold not in POLICIES:
        raise DataError(f"{name}: threshold {threshold!r} is neither a probability nor one of {', '.join(POLICIES)}")
    scale = 100 if entry.get("percent") else 1
    metrics, sd = {}, {}
    for key, value in entry["metrics"].items():
        if key not in protocols.METRICS + NOT_COMPUTED or not isinstance(value, int | float):
            raise DataError(
                f"{name}: metric {key}: {value!r}; metrics are numbers named {', '.join(protocols.METRICS)}"
            )
        metrics[key] = value / scale
    for key, value in (entry.get("sd") or {}).items():
        if key not in metrics:
            raise DataError(f"{name}: sd of {key}, which it does not publish")
        sd[key] = value / scale
    text = {key: str(entry[key]) for key in ("params", "training", "notes") if entry.get(key) is not None}
    return Published(
        str(entry["id"]),
        str(entry["source"]),
        str(entry["model"]),
        str(entry["dataset"]),
        str(entry["split"]),
        protocol,
        threshold,
        metrics,
        sd,
        second_observer=bool(entry.get("second_observer", False)),
        **text,
    )


def load_published(path: str | Path | None = None) -> list[Published]:
    """The published results of `path` (default: the file installed with retinaseg), each checked."""
    if path is None:
        text, where = (
            resources.files("retinaseg.evaluation").joinpath("published.yaml").read_text(),
            "retinaseg/evaluation/published.yaml",
        )
    else:
        text, where = Path(path).read_text(), str(path)
    entries = yaml.safe_load(text)
    if not isinstance(entries, list):
        raise DataError(f"{where} is not a list of published results")
    results = [parse(entry, where) for entry in entries]
    ids = [r.id for r in results]
    if len(set(ids)) != len(ids):
        raise DataError(f"{where}: ids {sorted({i for i in ids if ids.count(i) > 1})} appear twice")
    return results


@dataclass
class Row:
    """A line of the report: a published result (None for the diagnostic), the model under its protocol."""

    published: Published | None
    label: str
    protocol: str
    threshold: str
    status: str  # "scored", "diagnostic, not a result", or why it is not scored
    values: dict[str, protocols.Scored] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def chosen_threshold(evaluation: Evaluation | None, what: str, protocol: protocols.Protocol) -> int:
    """The bin edge maximising F1 on `evaluation` (the training or validation images) under `protocol`."""
    if evaluation is None:
        option = "train" if what == "train" else "val"
        raise LookupError(
            f"needs the {what} images' evaluation: {option}=<run dir of retinaseg.eval split={option} of this checkpoint>"
        )
    return protocols.best_f1_index(evaluation.histograms.scored(protocol), protocol.averaging)


def score_row(
    result: Published,
    test: Evaluation,
    chosen: dict[str, Evaluation | None],
    resamples: int,
    seed: int,
) -> Row:
    """The model scored as `result` was (or why it cannot be)."""
    row = Row(result, result.model, result.protocol_text, result.threshold_text, "scored")
    if result.threshold == "binarised":
        row.status = "not reproducible: an AUC computed from binarised predictions"
        return row
    if result.threshold == "test":
        row.status = "diagnostic, not a result"
    try:
        histograms = test.histograms.scored(result.protocol)
        if isinstance(result.threshold, float):
            index = protocols.threshold_index(histograms, result.threshold)
        elif result.threshold == "test":
            index = protocols.best_f1_index(histograms, result.protocol.averaging)
        else:
            index = chosen_threshold(chosen[result.threshold], result.threshold, result.protocol)
    except (DataError, LookupError) as error:
        row.status = f"not scored: {error}"
        return row
    values = protocols.score(
        protocols.confusion_at(histograms, index), histograms, result.protocol.averaging, resamples, seed
    )
    row.values = {key: values[key] for key in result.metrics if key in values}
    if not isinstance(result.threshold, float):
        row.threshold += f" ({protocols.edges(histograms)[index]:.4f})"
    if result.second_observer:
        if test.observer is not None and result.protocol.region == "fov" and result.protocol.pad_to is None:
            observer = protocols.score(test.observer, None, result.protocol.averaging, resamples, seed)
            row.notes.append(
                "second observer measured here: "
                + ", ".join(f"{NAMES[key]} {interval(observer[key])}" for key in result.metrics if key in observer)
            )
        else:
            row.notes.append("this evaluation has no second observer to measure")
    return row


def diagnostic_row(test: Evaluation, resamples: int, seed: int) -> Row:
    """The model at the threshold maximising its pooled FOV F1 on the very images scored."""
    oracle = Published(
        "diagnostic",
        "this evaluation",
        "this model, threshold tuned on the test images",
        str(test.settings.dataset),
        str(test.settings.split),
        protocols.Protocol("fov", "pooled"),
        "test",
        {"f1": float("nan")},
    )
    row = score_row(oracle, test, {}, resamples, seed)
    row.published = None
    row.notes.append("how much a threshold chosen on the test images would add; no paper's number")
    return row


def interval(scored: protocols.Scored, sign: str = "") -> str:
    text = f"{scored.value:{sign}.4f}"
    return text if scored.ci is None else f"{text} [{scored.ci[0]:{sign}.4f}, {scored.ci[1]:{sign}.4f}]"


def check_same_model(test: Evaluation, other: Evaluation, name: str, split: str) -> None:
    """`other` must score the same checkpoint's `split` images, in the same bins."""
    if other.settings.split != split:
        raise ConfigError(
            f"{name}={other.directory} scored split {other.settings.split}: pass an evaluation of split={split}"
        )
    if other.settings.checkpoint != test.settings.checkpoint:
        raise ConfigError(
            f"{name}={other.directory} evaluated {other.settings.checkpoint}, a={test.directory} evaluated "
            f"{test.settings.checkpoint}: a threshold must be chosen for the model it is applied to"
        )
    if not other.histograms.inside.same_bins(test.histograms.inside):
        raise DataError(
            f"{name} and a binned their probabilities differently: evaluate both with one retinaseg version"
        )


def report(
    test_dir: str,
    train_dir: str | None,
    val_dir: str | None,
    output_dir: Path,
    resamples: int,
    seed: int,
    published: list[Published] | None = None,
) -> list[Row]:
    """literature.md and literature.csv in `output_dir`: every published result on the dataset of the evaluation
    in `test_dir`, beside the model scored its way; the markdown is printed too."""
    test = EvaluationDirectory(test_dir).read("a")
    chosen: dict[str, Evaluation | None] = {"train": None, "validation": None}
    for policy, directory, name, split in (
        ("train", train_dir, "train", "train"),
        ("validation", val_dir, "val", "val"),
    ):
        if directory is not None:
            chosen[policy] = EvaluationDirectory(directory).read(name)
            check_same_model(test, chosen[policy], name, split)
    dataset = test.settings.dataset
    results = [r for r in (published if published is not None else load_published()) if r.dataset == dataset]
    if not results:
        raise DataError(f"no published result on dataset {dataset} in the data file")
    rows = [score_row(r, test, chosen, resamples, seed) for r in results]
    rows.append(diagnostic_row(test, resamples, seed))
    write_text(output_dir / "literature.csv", table_csv(rows))
    text = markdown(rows, test, chosen, resamples)
    write_text(output_dir / "literature.md", text)
    print(text, end="")
    return rows


def table_csv(rows: list[Row]) -> str:
    """One line per published metric (and the diagnostic's F1)."""
    out = io.StringIO()
    columns = [
        "id", "model", "source", "dataset", "split", "protocol", "threshold", "status", "metric", "published",
        "published_sd", "model_value", "ci_low", "ci_high", "difference", "params", "training", "notes",
    ]  # fmt: skip
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        r = row.published
        metrics = r.metrics if r is not None else {key: None for key in row.values}
        for key, published in metrics.items():
            scored = row.values.get(key)
            writer.writerow(
                {
                    "id": r.id if r else "diagnostic",
                    "model": row.label,
                    "source": r.source if r else "",
                    "dataset": r.dataset if r else "",
                    "split": r.split if r else "",
                    "protocol": row.protocol,
                    "threshold": row.threshold,
                    "status": row.status,
                    "metric": key,
                    "published": "" if published is None else published,
                    "published_sd": r.sd.get(key, "") if r else "",
                    "model_value": "" if scored is None else scored.value,
                    "ci_low": "" if scored is None or scored.ci is None else scored.ci[0],
                    "ci_high": "" if scored is None or scored.ci is None else scored.ci[1],
                    "difference": "" if scored is None or published is None else scored.value - published,
                    "params": (r.params or "") if r else "",
                    "training": (r.training or "") if r else "",
                    "notes": " ".join([*([r.notes] if r and r.notes else []), *row.notes]),
                }
            )
    return out.getvalue()


def markdown(rows: list[Row], test: Evaluation, chosen: dict[str, Evaluation | None], resamples: int) -> str:
    """literature.md: what was scored, then one table row per published result (its metrics one per line)."""
    m, s = test.metrics, test.settings
    lines = [
        f"# This model beside published results on {s.dataset}",
        "",
        f"- evaluation: `{test.directory.resolve()}` ({s.split} split, {s.n_images} images) of `{s.checkpoint}`",
        *(
            f"- thresholds chosen on {policy} images: `{e.directory.resolve()}` ({e.settings.n_images} images)"
            for policy, e in chosen.items()
            if e is not None
        ),
        (
            f"- [95% interval]: bootstrap over the {s.n_images} images ({resamples} resamples); "
            "difference = this model - published"
            if resamples
            else "- no intervals (bootstrap=0); difference = this model - published"
        ),
        "- every row is this model scored the way that result was (its pixels, averaging and threshold rule); "
        "thresholds are chosen to maximise F1 under that row's protocol",
        "- the published models were trained, split and preprocessed their own way: the rows say how, where the "
        "source does",
        *([f"- expected calibration error {m['ece']:.4f} (15 bins, FOV pixels)"] if "ece" in m else []),
        "",
        "| published result | source | protocol | threshold | metric | published | this model [95% interval] "
        "| difference | notes |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        r = row.published
        metrics = r.metrics if r is not None else {key: None for key in row.values}
        names, published, model, difference = [], [], [], []
        for key, value in metrics.items():
            names.append(NAMES.get(key, key))
            sd = r.sd.get(key) if r is not None else None
            published.append("-" if value is None else f"{value:.4f}" + (f" (sd {sd:.3f})" if sd is not None else ""))
            scored = row.values.get(key)
            if scored is None:
                model.append("not computed by retinaseg" if key in NOT_COMPUTED and row.status == "scored" else "-")
                difference.append("-")
            else:
                model.append(interval(scored))
                difference.append("-" if value is None else f"{scored.value - value:+.4f}")
        described = row.label
        if r is not None:
            described += "".join(f"; {text}" for text in (r.params and f"{r.params} parameters", r.training) if text)
        notes = [] if row.status == "scored" else [f"**{row.status}**"]
        notes += [r.notes] if r is not None and r.notes else []
        notes += row.notes
        cells = [
            described,
            r.source if r is not None else "this evaluation",
            row.protocol,
            row.threshold,
            "<br>".join(names),
            "<br>".join(published),
            "<br>".join(model),
            "<br>".join(difference),
            " ".join(notes),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
