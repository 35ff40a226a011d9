"""retinaseg.compare: two evaluations of the same images, metric by metric, from their files alone; evaluations that
cannot be paired honestly are refused in one line."""

import csv
import json
import shutil

import numpy as np
import pytest

from helpers import compose_config, run_entry_point
from retinaseg.compare import compare
from retinaseg.errors import DataError
from retinaseg.metrics import HEADLINE


def run_compare(a, b, output_dir, *overrides: str) -> dict:
    return compare(compose_config("compare", [f"a={a}", f"b={b}", *overrides], output_dir))


def keep_images(source, destination, ids: list[str]):
    """A copy of the evaluation in `source` that scored only the images `ids`, in that order."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("probabilities.npz", "predictions", "plots"))
    with open(source / "per_image.csv", newline="") as file:
        rows = {row["id"]: row for row in csv.DictReader(file)}
    with open(destination / "per_image.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(next(iter(rows.values()))))
        writer.writeheader()
        writer.writerows(rows[i] for i in ids)
    with np.load(source / "histograms.npz") as saved:
        order = [saved["ids"].tolist().index(i) for i in ids]
        arrays = {key: saved[key] for key in saved.files}
    np.savez_compressed(
        destination / "histograms.npz",
        **{
            **arrays,
            "ids": arrays["ids"][order],
            "positive": arrays["positive"][order],
            "negative": arrays["negative"][order],
        },
    )
    return destination


def test_an_evaluation_compared_with_itself_differs_by_nothing(drive_evaluation, tmp_path):
    directory, _ = drive_evaluation
    result = run_entry_point("compare", [f"a={directory}", f"b={directory}", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert result.returncode == 0, result.stderr
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    metrics = json.loads((directory / "metrics.json").read_text())
    assert comparison["n_images"] == 20 and set(comparison["metrics"]) == set(HEADLINE)
    for key, values in comparison["metrics"].items():
        assert values["difference"] == 0 and values["ci95"] == [0, 0] and values["p_value"] == 1, key
        # The AUC comes from the histograms: within 1e-4 of the exact one.
        assert values["a"] == pytest.approx(metrics[key], abs=1e-4 if key == "auc" else 1e-12), key
    table = (tmp_path / "comparison.md").read_text()
    assert "| F1 | " in table and "| clDice | " in table and table in result.stdout


def test_thresholds_chosen_differently_are_refused_unless_told(drive_evaluation, drive_evaluation_wandb, tmp_path):
    (a, _), b = drive_evaluation, drive_evaluation_wandb  # thresholds fixed at 0.5 and at 0.45
    result = run_entry_point("compare", [f"a={a}", f"b={b}", f"hydra.run.dir={tmp_path / 'refused'}"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "fixed at 0.5000" in line and "fixed at 0.4500" in line and "allow_different_thresholds=true" in line

    comparison = run_compare(a, b, tmp_path / "told", "allow_different_thresholds=true", "bootstrap=500")
    metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key, values in comparison["metrics"].items():
        tolerance = 1e-4 if key == "auc" else 1e-12
        assert values["a"] == pytest.approx(metrics_a[key], abs=tolerance)
        assert values["b"] == pytest.approx(metrics_b[key], abs=tolerance)
        assert values["difference"] == pytest.approx(values["b"] - values["a"], abs=1e-12)
        assert values["ci95"][0] <= values["difference"] <= values["ci95"][1] and 0 < values["p_value"] <= 1, key
    # A lower threshold marks more vessel pixels on every image: sensitivity up, significantly.
    sensitivity = comparison["metrics"]["sensitivity"]
    assert sensitivity["ci95"][0] > 0 and sensitivity["p_value"] < 0.01


def test_different_image_sets_are_refused_unless_told(drive_evaluation, tmp_path):
    directory, _ = drive_evaluation
    with open(directory / "per_image.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    ids = [row["id"] for row in rows]
    subset = keep_images(directory, tmp_path / "subset", ids[7:2:-1])  # 5 images, in another order
    with pytest.raises(DataError, match="different images .*allow_different_images=true"):
        run_compare(directory, subset, tmp_path / "refused")

    comparison = run_compare(directory, subset, tmp_path / "told", "allow_different_images=true")
    assert comparison["images"] == ids[3:8] and comparison["n_images"] == 5
    tp, fp, fn = (sum(int(row[key]) for row in rows[3:8]) for key in ("tp", "fp", "fn"))
    f1 = comparison["metrics"]["f1"]
    assert f1["a"] == f1["b"] == pytest.approx(2 * tp / (2 * tp + fp + fn)) and f1["p_value"] == 1

    # The same ids scored against another label are not the same images.
    relabelled = keep_images(directory, tmp_path / "relabelled", ids)
    with open(relabelled / "per_image.csv", newline="") as file:
        changed = list(csv.DictReader(file))
    changed[0]["fn"] = str(int(changed[0]["fn"]) + 1)
    with open(relabelled / "per_image.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(changed[0]))
        writer.writeheader()
        writer.writerows(changed)
    with pytest.raises(DataError, match="19 in common, 1 more with the same id but other labels"):
        run_compare(directory, relabelled, tmp_path / "relabelled_refused")


def test_an_evaluation_without_counts_is_refused(drive_evaluation, tmp_path):
    directory, _ = drive_evaluation
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(directory / "metrics.json", old)
    with pytest.raises(DataError, match="older retinaseg.eval; evaluate its checkpoint again"):
        run_compare(directory, old, tmp_path / "refused")
    with pytest.raises(DataError, match="b=<eval dir> is missing"):
        compare(compose_config("compare", [f"a={directory}"], tmp_path / "missing"))
    with pytest.raises(DataError, match="bootstrap must be a whole number"):
        run_compare(directory, directory, tmp_path / "negative", "bootstrap=-1")
