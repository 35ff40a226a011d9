"""`python -m retinaseg.compare a=<eval dir> b=<eval dir>`: is b better than a on the same images?
`python -m retinaseg.compare a=<eval dir> literature=true [train=<eval dir>]`: a beside published results, each
scored the way its paper scored (retinaseg.evaluation.literature: literature.md, literature.csv).

For each metric: a, b, b - a, the paired-bootstrap 95% interval of b - a and the two-sided p-value of a paired
permutation test (retinaseg.evaluation.stats.paired_comparison), recomputed without the models from what each evaluation
wrote: metrics.json, per_image.csv (per-image counts) and histograms.npz. Writes comparison.json and
comparison.md into its run directory and prints the table.
"""

import csv
import json
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, DataError, check_bool, check_int, exit_on_user_error
from retinaseg.core.safe_io import write_text
from retinaseg.evaluation import literature, stats
from retinaseg.evaluation.metrics import DISPLAY, Histograms, ImageCounts
from retinaseg.runs.rundir import RunDir

config.setup()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """What compare reads of an evaluation directory."""

    directory: Path
    metrics: dict
    counts: ImageCounts


def read_evaluation(directory: str | None, name: str) -> Evaluation:
    """metrics.json, per_image.csv's counts and histograms.npz of the evaluation in `directory` (argument `name`)."""
    if directory is None:
        raise ConfigError(
            f"{name}=<eval dir> is missing: pass the run directories of two retinaseg.eval runs, a=... b=..."
        )
    path = Path(directory).expanduser()
    run = RunDir(path)
    task = run.task()
    if run.sweep_config.is_file():
        raise DataError(
            f"{name}={directory} is the sweep directory of a multirun: pass the directory of one of its evaluations "
            f"(its numbered folders, e.g. {path / '0'})"
        )
    if task not in (None, "eval"):
        raise DataError(
            f"{name}={directory} is a {task} run, not an evaluation: evaluate its checkpoint with `python -m "
            "retinaseg.eval ckpt_path=<file.ckpt>` and pass that run's directory"
        )
    if not run.metrics.is_file():
        if task == "eval":
            raise DataError(
                f"{name}={directory}: its evaluation did not finish (metrics.json, written last, is missing): "
                "evaluate its checkpoint again"
            )
        raise DataError(f"{name}={directory} holds no metrics.json: pass the run directory of a retinaseg.eval run")
    metrics = read_metrics(path / "metrics.json", name)
    rows = []
    if (path / "per_image.csv").is_file():
        rows = read_rows(path / "per_image.csv", name)
    names = ImageCounts.column_names()
    if not (path / "histograms.npz").is_file() or not rows or not set(names) <= set(rows[0]):
        raise DataError(
            f"{name}={directory} has no per-image counts (per_image.csv's tp, fp, ... and histograms.npz): it was "
            "written by an older retinaseg.eval; evaluate its checkpoint again"
        )
    ids = [row["id"] for row in rows]
    columns = {key: column(rows, key, path / "per_image.csv", name) for key in names}
    histograms = read_histograms(path / "histograms.npz", name, ids)
    counts = ImageCounts.from_columns(ids, columns, histograms)
    check_consistent(counts, metrics, name, path)
    return Evaluation(path, metrics, counts)


def damaged(name: str, file: Path, what: str) -> DataError:
    return DataError(
        f"{name}={file.parent}: {file.name} {what}: it is damaged or was edited; evaluate the checkpoint again"
    )


def read_metrics(file: Path, name: str) -> dict:
    """metrics.json: an object with at least the threshold and how it was chosen."""
    try:
        metrics = json.loads(file.read_text())
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise damaged(name, file, f"cannot be read ({error})") from None
    if not isinstance(metrics, dict):
        raise damaged(name, file, f"holds a {type(metrics).__name__}, not an object of metrics")
    if not isinstance(metrics.get("threshold_from"), str) or not is_number(metrics.get("threshold")):
        raise damaged(name, file, "has no threshold and threshold_from")
    return metrics


def read_rows(file: Path, name: str) -> list[dict]:
    """per_image.csv's rows, each with a value in every column."""
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
    """One column of per_image.csv's counts: whole numbers, none negative."""
    try:
        values = np.array([int(row[key]) for row in rows], dtype=np.int64)
    except (ValueError, OverflowError) as error:
        raise damaged(name, file, f"has a {key} that is not a whole number ({error})") from None
    if (values < 0).any():
        raise damaged(name, file, f"has a negative {key} (an impossible count)")
    return values


def read_histograms(file: Path, name: str, ids: list[str]) -> Histograms:
    """histograms.npz (never unpickled): one row of non-negative counts per image of per_image.csv, in order."""
    try:
        with np.load(file, allow_pickle=False) as saved:
            listed = saved["ids"].tolist()
            positive, negative = saved["positive"], saved["negative"]
            logit_range = float(saved["logit_range"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError) as error:
        # ValueError: pickled objects (refused) or a damaged array; KeyError: an array missing.
        raise damaged(name, file, f"cannot be read ({error})") from None
    if listed != ids:
        raise DataError(f"{name}={file.parent}: histograms.npz and per_image.csv list different images")
    shape_ok = positive.ndim == 2 and positive.shape == negative.shape and positive.shape[0] == len(ids)
    if not shape_ok or not all(np.issubdtype(h.dtype, np.integer) for h in (positive, negative)):
        raise damaged(name, file, f"does not hold one row of counts per image of per_image.csv ({len(ids)})")
    positive, negative = positive.astype(np.int64), negative.astype(np.int64)
    if (positive < 0).any() or (negative < 0).any() or not np.isfinite(logit_range) or logit_range <= 0:
        raise damaged(name, file, "holds negative counts or an impossible logit range")
    return Histograms(positive, negative, logit_range)


def check_consistent(counts: ImageCounts, metrics: dict, name: str, path: Path) -> None:
    """Refuses counts that contradict each other or metrics.json: the histograms must count each image's vessel
    and background pixels as per_image.csv does, and the metrics recomputed from the counts must be
    metrics.json's (both were written by one evaluation)."""
    c = counts.confusion
    histograms = counts.histograms
    if not (
        np.array_equal(histograms.positive.sum(axis=1), c.tp + c.fn)
        and np.array_equal(histograms.negative.sum(axis=1), c.fp + c.tn)
    ):
        raise DataError(
            f"{name}={path}: histograms.npz and per_image.csv count different pixels: one of them was edited or comes "
            "from another evaluation; evaluate the checkpoint again"
        )
    if is_number(metrics.get("n_images")) and metrics["n_images"] != len(counts.ids):
        raise DataError(
            f"{name}={path}: metrics.json says {metrics['n_images']} images, per_image.csv has {len(counts.ids)}: one "
            "of them was edited or comes from another evaluation; evaluate the checkpoint again"
        )
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


def image_keys(counts: ImageCounts) -> list[tuple[str, int, int]]:
    """Each image as (id, vessel pixels, FOV pixels): the same photograph scored against the same label and FOV
    in two evaluations has the same key."""
    c = counts.confusion
    return [(i, int(p), int(t)) for i, p, t in zip(counts.ids, c.tp + c.fn, c.tp + c.fp + c.fn + c.tn)]


def paired_images(a: Evaluation, b: Evaluation, allow_different_images: bool) -> tuple[ImageCounts, ImageCounts]:
    """a's and b's counts of the same images in the same order; refused for different image sets unless
    `allow_different_images` (then the images both scored)."""
    keys_a, keys_b = image_keys(a.counts), image_keys(b.counts)
    if keys_a == keys_b:
        return a.counts, b.counts
    position = {key: n for n, key in enumerate(keys_b)}
    common = [n for n, key in enumerate(keys_a) if key in position]
    if not allow_different_images or not common:
        relabelled = len(set(a.counts.ids) & set(b.counts.ids)) - len(common)
        raise DataError(
            f"a and b scored different images (a: {len(keys_a)} of split {a.metrics.get('split')}, b: {len(keys_b)} "
            f"of split {b.metrics.get('split')}, {len(common)} in common"
            + (f", {relabelled} more with the same id but other labels or FOV masks" if relabelled else "")
            + "): compare evaluations of the same images"
            + (", or pass allow_different_images=true to compare those both scored" if common else "")
        )
    log.warning("comparing the %d images both evaluations scored (a: %d, b: %d)", len(common), len(keys_a), len(keys_b))
    return a.counts.select(common), b.counts.select([position[keys_a[n]] for n in common])


def threshold_rule(metrics: dict) -> str:
    """How an evaluation's threshold was chosen: the rule two evaluations must share (a fixed value, or a rule such
    as the validation images' best F1, which gives each model its own value)."""
    if metrics["threshold_from"] == "fixed":
        return f"fixed at {metrics['threshold']:.4f}"
    return f"chosen by {metrics['threshold_from']}"


def describe_threshold(metrics: dict) -> str:
    """The rule with the value it gave."""
    rule = threshold_rule(metrics)
    return rule if metrics["threshold_from"] == "fixed" else f"{rule} ({metrics['threshold']:.4f})"


def describe_binarisation(metrics: dict) -> str:
    """The binarisation options (retinaseg.inference.binarise) beyond the threshold; "off" also for an evaluation older than
    them."""
    options = metrics.get("binarisation") or {}
    parts = []
    if options.get("hysteresis") is not None:
        parts.append(f"hysteresis {options['hysteresis']:g} (low threshold {options['low_threshold']:.4g})")
    if options.get("min_size"):
        parts.append(f"min_size {options['min_size']}")
    chosen = options.get("chosen_on_validation_images")
    return (", ".join(parts) or "off") + (f"; {' and '.join(chosen)} chosen by validation F1" if chosen else "")


# What says how an evaluation was made, in comparison.md's and .json's description of a and b: (name, how it is read
# from metrics.json). An older metrics.json without an entry shows null.
SETTINGS = (
    ("checkpoint", lambda m: m.get("checkpoint")),
    ("dataset", lambda m: m.get("dataset")),
    ("split", lambda m: m.get("split")),
    ("images", lambda m: m.get("n_images")),
    ("threshold", describe_threshold),
    ("binarisation", describe_binarisation),
    ("tta", lambda m: m.get("tta")),
    ("backend", lambda m: (m.get("inference") or {}).get("backend")),
    ("precision", lambda m: (m.get("inference") or {}).get("precision")),
    ("inference", lambda m: (m.get("inference") or {}).get("mode")),
    ("scale", lambda m: m.get("scale")),
    ("fov", lambda m: m.get("fov")),
)


def describe(metrics: dict) -> dict:
    """How an evaluation was made (SETTINGS), from its metrics.json."""
    return {name: read(metrics) for name, read in SETTINGS}


def compare(cfg: DictConfig) -> dict:
    """Compare evaluation b with evaluation a; write comparison.json and comparison.md; return the former's content."""
    stats.check_resamples("bootstrap", cfg.bootstrap)
    check_int("seed", cfg.seed)
    check_bool("allow_different_images", cfg.allow_different_images)
    check_bool("allow_different_thresholds", cfg.allow_different_thresholds)
    a, b = read_evaluation(cfg.a, "a"), read_evaluation(cfg.b, "b")
    counts_a, counts_b = paired_images(a, b, cfg.allow_different_images)
    if threshold_rule(a.metrics) != threshold_rule(b.metrics) and not cfg.allow_different_thresholds:
        raise ConfigError(
            f"a's threshold was {describe_threshold(a.metrics)}, b's {describe_threshold(b.metrics)}: the threshold "
            "metrics would differ by how the threshold was chosen; evaluate both the same way, or pass "
            "allow_different_thresholds=true"
        )
    if not counts_a.histograms.same_bins(counts_b.histograms):
        raise DataError("a and b binned their probabilities differently: evaluate both with the same retinaseg version")
    n = len(counts_a.ids)
    both = ImageCounts.concatenate(counts_a, counts_b)
    differences = stats.paired_comparison(both.pooled, n, cfg.bootstrap, cfg.seed)
    settings_a, settings_b = describe(a.metrics), describe(b.metrics)
    result = {
        "a": str(a.directory.resolve()),
        "b": str(b.directory.resolve()),
        "threshold_a": describe_threshold(a.metrics),
        "threshold_b": describe_threshold(b.metrics),
        "settings": {"a": settings_a, "b": settings_b},
        # What tells a and b apart: the settings they were evaluated with that differ.
        "differs_in": [name for name in settings_a if settings_a[name] != settings_b[name]],
        "images": list(counts_a.ids),
        "n_images": n,
        "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "level": 0.95},
        "metrics": {key: difference.to_json() for key, difference in differences.items()},
    }
    output_dir = Path(cfg.paths.output_dir)
    write_text(output_dir / "comparison.json", json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    write_text(output_dir / "comparison.md", report)
    print(report, end="")
    log.info("comparison written to %s", output_dir)
    return result


def shown(value) -> str:
    """A setting as comparison.md's table shows it (a path in code font, null as -)."""
    if value is None:
        return "-"
    return f"`{value}`" if isinstance(value, str) and "/" in value else str(value)


def markdown(result: dict) -> str:
    """comparison.md: what was compared and one table row per metric."""
    resamples = result["bootstrap"]["resamples"]
    lines = [
        "# b - a",
        "",
        f"- a: `{result['a']}`, threshold {result['threshold_a']}",
        f"- b: `{result['b']}`, threshold {result['threshold_b']}",
        "- a and b differ in: " + (", ".join(result["differs_in"]) or "nothing but the directory they were written to"),
        f"- {result['n_images']} images paired; FOV pixels pooled; AUC from the evaluations' histograms",
        (
            f"- 95% interval: paired bootstrap over images ({resamples} resamples); p: two-sided paired permutation "
            f"test ({resamples} random swaps of a and b per image); seed {result['bootstrap']['seed']}"
            if resamples
            else "- no intervals (bootstrap=0)"
        ),
        "",
        "| setting | a | b | differs |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {shown(value)} | {shown(result['settings']['b'][name])} | "
            f"{'yes' if name in result['differs_in'] else ''} |"
            for name, value in result["settings"]["a"].items()
        ),
        "",
        "| metric | a | b | b - a | 95% interval of b - a | p |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for key, (name, decimals) in DISPLAY.items():
        if key not in result["metrics"]:
            continue
        name += " (lower is better)" if key == "betti0_error" else ""
        m = result["metrics"][key]
        ci = "-" if m["ci95"] is None else f"[{m['ci95'][0]:+.{decimals}f}, {m['ci95'][1]:+.{decimals}f}]"
        p = "-" if m["p_value"] is None else f"{m['p_value']:.2g}"
        lines.append(
            f"| {name} | {m['a']:.{decimals}f} | {m['b']:.{decimals}f} | {m['difference']:+.{decimals}f} | {ci} | {p} |"
        )
    return "\n".join(lines) + "\n"


def compare_with_literature(cfg: DictConfig) -> list[literature.Row]:
    """`literature=true`: evaluation a beside the published results on its dataset (retinaseg.evaluation.literature)."""
    check_int("bootstrap", cfg.bootstrap, minimum=0)
    check_int("seed", cfg.seed)
    if cfg.a is None:
        raise ConfigError(
            "a=<eval dir> is missing: pass the run directory of the retinaseg.eval run to set beside the literature"
        )
    directories = (cfg.a, cfg.get("train"), cfg.get("val"))
    return literature.report(*directories, Path(cfg.paths.output_dir), cfg.bootstrap, cfg.seed)


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        check_bool("literature", cfg.literature)
        if cfg.literature:
            compare_with_literature(cfg)
        else:
            compare(cfg)


if __name__ == "__main__":
    main()
