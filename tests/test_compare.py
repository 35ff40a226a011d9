"""retinaseg.compare: two evaluations of the same images, metric by metric, from their files alone; evaluations that
cannot be paired honestly are refused in one line."""

import csv
import json
import re
import shutil

import numpy as np
import pytest

from helpers.commands import error_lines, run_entry_point
from helpers.configs import compose_config
from retinaseg.compare import compare
from retinaseg.core.errors import ConfigError, DataError
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.evaluation.counts import HEADLINE, Histograms
from retinaseg.evaluation.directory import EvaluationDirectory, EvaluationSettings
from retinaseg.evaluation.scoring import ImageCounts, score


def write_evaluation(directory, quality: float, threshold: float = 0.5, threshold_from: str = "fixed", n: int = 8):
    """An evaluation directory as retinaseg.eval writes it, of n synthetic images whose probabilities separate
    vessels from background by `quality` (different per image, as real images differ)."""
    samples = synthetic_samples(n, height=64, width=64)
    rng = np.random.default_rng(int(quality * 100))
    probs = {}
    for s in samples:
        shift = quality * rng.uniform(0.5, 1.5)
        logit = np.where(s.label > 0, rng.normal(shift, 2.0, s.label.shape), rng.normal(-3.0, 2.0, s.label.shape))
        probs[s.id] = (1 / (1 + np.exp(-logit))).astype(np.float32)
    scores = score(
        [s.id for s in samples],
        [probs[s.id] for s in samples],
        [s.label for s in samples],
        [s.fov for s in samples],
        threshold,
        None,
        200,
        0,
    )
    settings = EvaluationSettings(threshold=threshold, threshold_from=threshold_from, split="test", n_images=n)
    EvaluationDirectory(directory).write_scores(scores, probs, samples)
    EvaluationDirectory(directory).write_metrics(scores.metrics, settings)
    return directory


def run_compare(a, b, output_dir, *overrides: str) -> dict:
    return compare(compose_config("compare", [f"a={a}", f"b={b}", *overrides], output_dir))


def read_rows(directory) -> list[dict]:
    with open(directory / "per_image.csv", newline="") as file:
        return list(csv.DictReader(file))


def write_rows(directory, rows: list[dict]) -> None:
    with open(directory / "per_image.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def keep_images(source, destination, ids: list[str]):
    """A copy of the evaluation in `source` that scored only the images `ids`, in that order."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("probabilities.npz", "predictions"))
    rows = {row["id"]: row for row in read_rows(source)}
    write_rows(destination, [rows[i] for i in ids])
    with np.load(source / "histograms.npz") as saved:
        order = [saved["ids"].tolist().index(i) for i in ids]
        arrays = {key: saved[key] for key in saved.files}
    for key in ("ids", "positive", "negative", "outside_positive", "outside_negative"):
        arrays[key] = arrays[key][order]
    np.savez_compressed(destination / "histograms.npz", **arrays)
    rescore(destination)
    return destination


def rescore(directory):
    """metrics.json's pooled metrics and image count recomputed from the evaluation's per-image files, as an
    evaluation of those images would have written them."""
    rows = read_rows(directory)
    columns = {key: np.array([int(row[key]) for row in rows]) for key in ImageCounts.column_names()}
    with np.load(directory / "histograms.npz") as saved:
        histograms = Histograms(saved["positive"].astype(np.int64), saved["negative"].astype(np.int64))
    counts = ImageCounts.from_columns([row["id"] for row in rows], columns, histograms)
    metrics = json.loads((directory / "metrics.json").read_text())
    metrics.update(counts.total(), n_images=len(rows))
    (directory / "metrics.json").write_text(json.dumps(metrics))


def test_an_evaluation_compared_with_itself_differs_by_nothing(tmp_path):
    directory = write_evaluation(tmp_path / "eval", quality=2.0)
    comparison = run_compare(directory, directory, tmp_path / "compare")
    metrics = json.loads((directory / "metrics.json").read_text())
    assert comparison["n_images"] == 8 and set(comparison["metrics"]) == set(HEADLINE)
    for key, values in comparison["metrics"].items():
        assert values["difference"] == 0 and values["ci95"] == [0, 0] and values["p_value"] == 1, key
        # The AUC comes from the histograms: within 1e-4 of the exact one.
        assert values["a"] == pytest.approx(metrics[key], abs=1e-4 if key == "auc" else 1e-12), key
    table = (tmp_path / "compare" / "comparison.md").read_text()
    assert "| F1 | " in table and "| clDice | " in table


def test_a_better_evaluation_is_compared_metric_by_metric(tmp_path):
    a, b = write_evaluation(tmp_path / "a", quality=1.0), write_evaluation(tmp_path / "b", quality=3.0)
    comparison = run_compare(a, b, tmp_path / "compare", "bootstrap=1000")
    metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key, values in comparison["metrics"].items():
        tolerance = 1e-4 if key == "auc" else 1e-12
        assert values["a"] == pytest.approx(metrics_a[key], abs=tolerance)
        assert values["b"] == pytest.approx(metrics_b[key], abs=tolerance)
        assert values["difference"] == pytest.approx(values["b"] - values["a"], abs=1e-12)
        assert values["ci95"][0] <= values["difference"] <= values["ci95"][1] and 0 < values["p_value"] <= 1, key
    # Vessels that stand out more on every image: better sensitivity and AUC, significantly.
    for key in ("sensitivity", "auc"):
        assert comparison["metrics"][key]["ci95"][0] > 0 and comparison["metrics"][key]["p_value"] < 0.01
    assert run_compare(a, b, tmp_path / "again", "bootstrap=1000") == comparison  # seeded


def test_thresholds_chosen_differently_are_refused_unless_told(tmp_path):
    a = write_evaluation(tmp_path / "a", quality=2.0)
    b = write_evaluation(tmp_path / "b", quality=2.0, threshold=0.42, threshold_from="validation F1")
    with pytest.raises(ConfigError, match="fixed at 0.5000, b's chosen by validation F1 .0.4200.*allow_different"):
        run_compare(a, b, tmp_path / "refused")
    comparison = run_compare(a, b, tmp_path / "told", "allow_different_thresholds=true")
    assert comparison["metrics"]["sensitivity"]["difference"] > 0  # a lower threshold marks more vessel
    # Two thresholds each chosen on validation images are chosen the same way.
    c = write_evaluation(tmp_path / "c", quality=3.0, threshold=0.55, threshold_from="validation F1")
    assert run_compare(b, c, tmp_path / "both_val")["threshold_b"] == "chosen by validation F1 (0.5500)"


def test_different_image_sets_are_refused_unless_told(tmp_path):
    directory = write_evaluation(tmp_path / "eval", quality=2.0)
    rows = read_rows(directory)
    ids = [row["id"] for row in rows]
    subset = keep_images(directory, tmp_path / "subset", ids[6:1:-1])  # 5 images, in another order
    with pytest.raises(DataError, match="different images .*allow_different_images=true"):
        run_compare(directory, subset, tmp_path / "refused")

    comparison = run_compare(directory, subset, tmp_path / "told", "allow_different_images=true")
    assert comparison["images"] == ids[2:7] and comparison["n_images"] == 5
    tp, fp, fn = (sum(int(row[key]) for row in rows[2:7]) for key in ("tp", "fp", "fn"))
    f1 = comparison["metrics"]["f1"]
    assert f1["a"] == f1["b"] == pytest.approx(2 * tp / (2 * tp + fp + fn)) and f1["p_value"] == 1

    # The same ids scored against another label are not the same images.
    relabelled = keep_images(directory, tmp_path / "relabelled", ids)
    changed = read_rows(relabelled)
    changed[0]["fn"] = str(int(changed[0]["fn"]) + 1)
    changed[0]["tn"] = str(int(changed[0]["tn"]) - 1)
    write_rows(relabelled, changed)
    with np.load(relabelled / "histograms.npz") as saved:
        arrays = {key: saved[key] for key in saved.files}
    busiest = arrays["negative"][0].argmax()  # one background pixel is a vessel in this label
    arrays["positive"][0, busiest] += 1
    arrays["negative"][0, busiest] -= 1
    np.savez_compressed(relabelled / "histograms.npz", **arrays)
    rescore(relabelled)
    with pytest.raises(DataError, match="7 in common, 1 more with the same id but other labels"):
        run_compare(directory, relabelled, tmp_path / "relabelled_refused")


def test_an_evaluation_without_counts_and_bad_settings_are_refused(tmp_path):
    directory = write_evaluation(tmp_path / "eval", quality=2.0)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(directory / "metrics.json", old)
    with pytest.raises(DataError, match="older retinaseg.eval; evaluate its checkpoint again"):
        run_compare(directory, old, tmp_path / "refused")
    with pytest.raises(ConfigError, match="b=<eval dir> is missing"):
        compare(compose_config("compare", [f"a={directory}"], tmp_path / "missing"))
    with pytest.raises(ConfigError, match="bootstrap must be an integer >= 0"):
        run_compare(directory, directory, tmp_path / "negative", "bootstrap=-1")


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def edit_row(directory, key, value, row: int = 0):
    rows = read_rows(directory)
    rows[row][key] = value
    write_rows(directory, rows)


def edit_histograms(directory, **changes):
    with np.load(directory / "histograms.npz") as saved:
        arrays = {key: saved[key] for key in saved.files}
    arrays.update(changes)
    np.savez(directory / "histograms.npz", **arrays)


DAMAGES = {
    "truncated-metrics": (lambda d: (d / "metrics.json").write_text('{"f1": 0.8, "thr'), "metrics.json cannot be read"),
    "list-metrics": (lambda d: edit_json(d / "metrics.json", lambda m: list(m)), "metrics.json holds a list"),
    "no-threshold": (
        lambda d: edit_json(d / "metrics.json", lambda m: {k: v for k, v in m.items() if k != "threshold"}),
        "metrics.json has no threshold",
    ),
    "bad-count": (lambda d: edit_row(d, "tp", "many"), "per_image.csv has a tp that is not a whole number"),
    "short-row": (
        lambda d: (d / "per_image.csv").write_text((d / "per_image.csv").read_text().rsplit(",", 3)[0] + "\n"),
        "per_image.csv has fewer values on line 9 than columns",
    ),
    "negative-tp": (lambda d: edit_row(d, "tp", "-5"), "per_image.csv has a negative tp"),
    "truncated-histograms": (
        lambda d: (d / "histograms.npz").write_bytes((d / "histograms.npz").read_bytes()[:300]),
        "histograms.npz cannot be read",
    ),
    "pickled-histograms": (
        lambda d: edit_histograms(d, positive=np.array([{"run": "code"}], dtype=object)),
        "histograms.npz cannot be read .*allow_pickle",
    ),
    "missing-histogram": (
        lambda d: np.savez(d / "histograms.npz", ids=np.array([r["id"] for r in read_rows(d)])),
        "histograms.npz cannot be read",
    ),
    "rows-disagree": (
        lambda d: edit_histograms(d, positive=np.zeros((3, 200), np.uint32), negative=np.zeros((3, 200), np.uint32)),
        "histograms.npz does not hold one row of counts per image of per_image.csv",
    ),
    "histograms-contradict-counts": (
        lambda d: edit_row(d, "tp", str(int(read_rows(d)[0]["tp"]) + 7)),
        "histograms.npz and per_image.csv count different pixels",
    ),
    "metrics-contradict-counts": (
        lambda d: edit_json(d / "metrics.json", lambda m: {**m, "f1": m["f1"] + 0.01}),
        "metrics.json says f1 .* but the per-image counts give",
    ),
    "image-count-contradicts": (
        lambda d: edit_json(d / "metrics.json", lambda m: {**m, "n_images": 9}),
        "metrics.json says 9 images, per_image.csv has 8",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_or_edited_evaluation_files_are_refused_in_one_line(damage, tmp_path):
    good = write_evaluation(tmp_path / "good", quality=2.0)
    bad = shutil.copytree(good, tmp_path / "bad")
    change, expected = DAMAGES[damage]
    change(bad)
    with pytest.raises(DataError, match=f"b={bad}: {expected}"):
        run_compare(good, bad, tmp_path / "refused")


@pytest.mark.slow
def test_a_damaged_evaluation_file_is_one_error_line_and_exit_2(tmp_path):
    good = write_evaluation(tmp_path / "good", quality=2.0)
    bad = shutil.copytree(good, tmp_path / "bad")
    edit_row(bad, "tp", "")
    result = run_entry_point("compare", [f"a={good}", f"b={bad}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert error_lines(result.stderr) == [
        f"error: b={bad}: per_image.csv has a tp that is not a whole number (invalid literal for int() with base 10: "
        "''): it is damaged or was edited; evaluate the checkpoint again"
    ]


@pytest.mark.slow
def test_compare_on_drive_evaluations_as_a_user_types_it(drive_evaluation, drive_evaluation_wandb, tmp_path):
    (a, _), b = drive_evaluation, drive_evaluation_wandb  # thresholds fixed at 0.5 and at 0.45
    result = run_entry_point("compare", [f"a={a}", f"b={a}", f"hydra.run.dir={tmp_path / 'self'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    comparison = json.loads((tmp_path / "self" / "comparison.json").read_text())
    assert comparison["n_images"] == 20 and all(m["ci95"] == [0, 0] for m in comparison["metrics"].values())
    assert (tmp_path / "self" / "comparison.md").read_text() in result.stdout

    result = run_entry_point("compare", [f"a={a}", f"b={b}", f"hydra.run.dir={tmp_path / 'refused'}"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "fixed at 0.5000" in line and "fixed at 0.4500" in line and "allow_different_thresholds=true" in line

    told = ["allow_different_thresholds=true", f"hydra.run.dir={tmp_path / 'told'}"]
    assert run_entry_point("compare", [f"a={a}", f"b={b}", *told], tmp_path).returncode == 0
    comparison = json.loads((tmp_path / "told" / "comparison.json").read_text())
    metrics_b = json.loads((b / "metrics.json").read_text())
    assert comparison["metrics"]["f1"]["b"] == pytest.approx(metrics_b["f1"], abs=1e-12)


def test_a_and_b_are_described_and_what_differs_is_named(tmp_path):
    a, b = write_evaluation(tmp_path / "a", quality=2.0), write_evaluation(tmp_path / "b", quality=2.0)
    for directory, tta, backend in ((a, False, "torch"), (b, True, "openvino")):
        metrics = json.loads((directory / "metrics.json").read_text())
        metrics.update(
            checkpoint="/runs/x/checkpoints/best.ckpt",
            dataset="drive",
            tta=tta,
            inference={"mode": "whole", "backend": backend, "precision": "fp32"},
            scale=1.0,
        )
        (directory / "metrics.json").write_text(json.dumps(metrics))
    comparison = run_compare(a, b, tmp_path / "compare")
    assert comparison["differs_in"] == ["tta", "backend"]
    assert comparison["settings"]["a"]["checkpoint"] == "/runs/x/checkpoints/best.ckpt"
    assert comparison["settings"]["b"]["threshold"] == "fixed at 0.5000"
    table = (tmp_path / "compare" / "comparison.md").read_text()
    assert "- a and b differ in: tta, backend" in table
    assert "| backend | torch | openvino | yes |" in table and "| dataset | drive | drive |  |" in table
    assert json.loads((tmp_path / "compare" / "comparison.json").read_text())["differs_in"] == ["tta", "backend"]


def test_an_unfinished_evaluation_a_training_run_and_a_sweep_are_named_as_such(tmp_path):
    directory = write_evaluation(tmp_path / "eval", quality=2.0)
    for folder, task, files in (
        ("unfinished", "eval", ["per_image.csv", "histograms.npz"]),
        ("training", "train", ["metrics.json"]),
    ):
        (tmp_path / folder / ".hydra").mkdir(parents=True)
        (tmp_path / folder / ".hydra" / "config.yaml").write_text(f"task_name: {task}\n")
        for name in files:
            shutil.copy(directory / name, tmp_path / folder)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "multirun.yaml").write_text("task_name: eval\n")
    for folder, message in (
        ("unfinished", "its evaluation did not finish (metrics.json, written last, is missing)"),
        ("training", "is a train run, not an evaluation: evaluate its checkpoint"),
        ("sweep", "is the sweep directory of a multirun"),
    ):
        with pytest.raises(DataError, match=re.escape(message)):
            run_compare(directory, tmp_path / folder, tmp_path / f"refused_{folder}")
