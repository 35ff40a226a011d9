"""retinaseg.eval: the DRIVE protocol's numbers, the files they are recomputed from, and a threshold never tuned on test labels."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from skimage import measure
from skimage.morphology import skeletonize
from sklearn.metrics import f1_score, roc_auc_score

from helpers.checkpoints import write_checkpoint
from helpers.commands import run_entry_point
from helpers.configs import TINY_SYNTHETIC, compose_config
from helpers.datasets import link_drive, read_split
from helpers.wandb_records import wandb_runs
from retinaseg.core.errors import ConfigError
from retinaseg.eval import evaluate
from retinaseg.evaluation import protocols
from retinaseg.evaluation.counts import HEADLINE, REPORTED, Histograms
from retinaseg.evaluation.directory import EvaluationDirectory


def run_eval(ckpt_path, overrides: list[str], output_dir) -> dict:
    return evaluate(compose_config("eval", [f"ckpt_path={ckpt_path}", *overrides], output_dir))


@pytest.mark.slow
def test_eval_files_recompute_independently(drive_root, drive_evaluation):
    directory, printed = drive_evaluation
    metrics = json.loads((directory / "metrics.json").read_text())
    assert (
        metrics["region"] == "fov"
        and metrics["n_images"] == 20
        and metrics["threshold"] == 0.5
        and metrics["split"] == "test"
    )
    for group in (metrics, metrics["per_image_mean"]):
        assert set(HEADLINE) <= set(group)
    assert set(REPORTED) <= set(metrics["whole_image"])
    assert set(HEADLINE) - set(metrics["second_observer"]) == {"auc"}  # a binary mask has no ROC curve
    assert "second observer" in printed
    assert (directory / "plots" / "predictions.png").is_file() and (directory / "plots" / "roc_pr.png").is_file()
    assert (directory / "plots" / "reliability.png").is_file() and "expected calibration error" in printed

    samples = read_split("drive", drive_root, "test")
    with open(directory / "per_image.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["id"] for row in rows] == [s.id for s in samples]
    probs = np.load(directory / "probabilities.npz")
    assert sorted(probs.files) == [s.id for s in samples]
    assert all(probs[s.id].shape == (584, 565) and probs[s.id].dtype == np.float32 for s in samples)

    # scikit-learn on the saved probabilities and the labels read afresh gives the same numbers.
    threshold = metrics["threshold"]
    p = np.concatenate([probs[s.id][s.fov] for s in samples])
    y = np.concatenate([s.label[s.fov] for s in samples])
    assert metrics["f1"] == pytest.approx(f1_score(y, p > threshold), abs=1e-6)
    exact_auc = roc_auc_score(y, p)
    assert metrics["auc"] == pytest.approx(exact_auc, abs=1e-5)
    whole_p = np.concatenate([probs[s.id].ravel() for s in samples])
    whole_y = np.concatenate([s.label.ravel() for s in samples])
    assert metrics["whole_image"]["f1"] == pytest.approx(f1_score(whole_y, whole_p > threshold), abs=1e-6)
    per_image_f1 = [f1_score(s.label[s.fov], probs[s.id][s.fov] > threshold, zero_division=0) for s in samples]
    assert [float(row["f1"]) for row in rows] == pytest.approx(per_image_f1, abs=1e-6)
    assert metrics["per_image_mean"]["f1"] == pytest.approx(np.mean(per_image_f1), abs=1e-6)
    for s in samples[:3]:
        mask = np.array(Image.open(directory / "predictions" / f"{s.id}.png"))
        assert np.array_equal(mask, ((probs[s.id] > threshold) & s.fov).astype(np.uint8) * 255)

    # Topology by the formulas of Shit et al. with scikit-image, for the second observer's mask of one image (this
    # tiny model's own mask may be empty).
    s = samples[0]
    with open(directory / "per_image_second_observer.csv", newline="") as file:
        observer_rows = list(csv.DictReader(file))
    assert [row["id"] for row in observer_rows] == [s.id for s in samples]
    prediction, label = (s.second_label > 0) & s.fov, (s.label > 0) & s.fov
    topology_precision = (skeletonize(prediction) & label).sum() / skeletonize(prediction).sum()
    topology_sensitivity = (skeletonize(label) & prediction).sum() / skeletonize(label).sum()
    assert float(observer_rows[0]["cldice"]) == pytest.approx(
        2 * topology_precision * topology_sensitivity / (topology_precision + topology_sensitivity)
    )
    components = (measure.label(prediction, connectivity=2).max(), measure.label(label, connectivity=2).max())
    assert (int(observer_rows[0]["components"]), int(observer_rows[0]["label_components"])) == components
    assert float(observer_rows[0]["betti0_error"]) == abs(components[0] - components[1])

    # The per-image counts and histograms hold the pooled numbers: AUC within 1e-4 of the exact one.
    tp, fp, fn = (sum(int(row[key]) for row in rows) for key in ("tp", "fp", "fn"))
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    with np.load(directory / "histograms.npz") as saved:
        assert saved["ids"].tolist() == [s.id for s in samples]
        histograms = Histograms(saved["positive"], saved["negative"], float(saved["logit_range"]))
    assert histograms.pooled(np.ones(20))["auc"] == pytest.approx(exact_auc, abs=1e-4)
    # Other papers' ways of scoring, from the histograms alone (outside the FOV too), give eval's own numbers.
    saved = EvaluationDirectory(directory).read("a").histograms
    for name, expected in (
        ("whole_image_pooled", metrics["whole_image"]),
        ("fov_mean_per_image", metrics["per_image_mean"]),
    ):
        protocol = protocols.Protocol.named(name)
        scored = saved.scored(protocol)
        confusion = protocols.confusion_at(scored, protocols.threshold_index(scored, threshold))
        values = protocols.score(confusion, scored, protocol.averaging, 0, 0)
        assert values["f1"].value == pytest.approx(expected["f1"], abs=1e-4), name
    # The expected calibration error of 15 equal-width bins, counted plainly.
    bins = np.minimum((p * 15).astype(int), 14)
    gaps = [abs(y[bins == b].mean() - p[bins == b].mean()) * (bins == b).sum() for b in range(15) if (bins == b).any()]
    assert metrics["ece"] == pytest.approx(sum(gaps) / len(p), abs=1e-7)

    # Every headline number has a 95% interval that contains it, the second observer's too.
    assert metrics["bootstrap"] == {"resamples": 2000, "seed": 0, "level": 0.95}
    for values in (metrics, metrics["second_observer"]):
        assert set(values["ci95"]) == set(HEADLINE) & set(values)
        for key, (low, high) in values["ci95"].items():
            assert low <= values[key] <= high, key
    low, high = metrics["ci95"]["f1"]
    assert f"{metrics['f1']:.4f} [{low:.4f}, {high:.4f}]" in printed
    difference = metrics["model_minus_second_observer"]["f1"]
    assert difference["difference"] == pytest.approx(metrics["f1"] - metrics["second_observer"]["f1"])
    assert difference["ci95"][0] <= difference["difference"] <= difference["ci95"][1] and 0 < difference["p_value"] <= 1

    # The human reference of data/README.md.
    observer = metrics["second_observer"]
    assert observer["f1"] == pytest.approx(0.7891, abs=5e-5) and observer["accuracy"] == pytest.approx(0.9473, abs=5e-5)
    assert observer["sensitivity"] == pytest.approx(0.7746, abs=5e-5) and observer["specificity"] == pytest.approx(
        0.9725, abs=5e-5
    )
    # and its topology (docs/evaluation.md): clDice 0.7635, Betti-0 error 0.85 components per image.
    assert observer["cldice"] == pytest.approx(0.7635, abs=5e-5) and observer["betti0_error"] == pytest.approx(0.85)


@pytest.mark.slow
def test_eval_logs_topology_intervals_and_counts_to_wandb(drive_evaluation_wandb):
    metrics = json.loads((drive_evaluation_wandb / "metrics.json").read_text())
    assert metrics["threshold"] == 0.45 and metrics["bootstrap"]["resamples"] == 500
    (run,) = wandb_runs(drive_evaluation_wandb)  # read back from W&B's own run file
    assert run.config["bootstrap"] == metrics["bootstrap"]
    assert (
        run.summary["test/cldice"] == metrics["cldice"] and run.summary["test/betti0_error"] == metrics["betti0_error"]
    )
    assert run.summary["test/ci95/f1/lo"] == metrics["ci95"]["f1"][0]
    # The calibration error and its reliability diagram, beside the other plots.
    assert run.summary["test/ece"] == metrics["ece"] and run.summary["plots/reliability/filenames"]
    assert (
        run.summary["test/second_observer/ci95/betti0_error/hi"]
        == metrics["second_observer"]["ci95"]["betti0_error"][1]
    )
    difference = metrics["model_minus_second_observer"]["cldice"]
    assert run.summary["test/model_minus_second_observer/cldice/p_value"] == difference["p_value"]
    table = json.loads((run.files / run.summary["test/per_image/path"]).read_text())
    assert {"id", "cldice", "betti0_error", "tp", "components"} <= set(table["columns"]) and len(table["data"]) == 20


def drive_with_inverted_test_labels(drive_root, dest):
    """A DRIVE folder with the real training split and two test images whose labels are inverted."""
    link_drive(drive_root, dest, "training", range(21, 41))
    link_drive(drive_root, dest, "test", (1, 2), ("images", "mask"))
    (dest / "test" / "1st_manual").mkdir()
    for number in ("01", "02"):
        label = np.array(Image.open(drive_root / "test" / "1st_manual" / f"{number}_manual1.gif").convert("L"))
        Image.fromarray(255 - label).save(dest / "test" / "1st_manual" / f"{number}_manual1.png")
    return dest


def pooled_f1(probs, labels, threshold: float) -> float:
    predicted = probs > threshold
    tp, fp, fn = (predicted & labels).sum(), (predicted & ~labels).sum(), (~predicted & labels).sum()
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.slow
def test_threshold_val_is_chosen_on_validation_images_only(drive_root, drive_checkpoint, tmp_path):
    val = run_eval(
        drive_checkpoint, [f"data.root={drive_root}", "threshold=val", "split=val", "plot_images=0"], tmp_path / "val"
    )
    assert val["threshold_from"] == "validation F1" and val["n_images"] == 4 and "second_observer" not in val
    # On the validation images no threshold of a fine grid beats the chosen one.
    probs = np.load(tmp_path / "val" / "probabilities.npz")
    samples = [s for s in read_split("drive", drive_root, "train") if s.id in probs.files]
    p = np.concatenate([probs[s.id][s.fov] for s in samples])
    y = np.concatenate([s.label[s.fov] for s in samples]).astype(bool)
    assert val["f1"] == pytest.approx(pooled_f1(p, y, val["threshold"]), abs=1e-6)
    assert val["f1"] >= max(pooled_f1(p, y, t) for t in np.linspace(0.01, 0.99, 99)) - 1e-9

    # Scoring the test split with inverted test labels: the scores show the inversion, the threshold does not.
    root = drive_with_inverted_test_labels(drive_root, tmp_path / "DRIVE")
    test = run_eval(drive_checkpoint, [f"data.root={root}", "threshold=val", "plot_images=0"], tmp_path / "test")
    assert test["threshold"] == val["threshold"] and test["n_images"] == 2
    probs = np.load(tmp_path / "test" / "probabilities.npz")
    inverted = read_split("drive", root, "test")
    p = np.concatenate([probs[s.id][s.fov] for s in inverted])
    y = np.concatenate([s.label[s.fov] for s in inverted]).astype(bool)
    assert test["f1"] == pytest.approx(pooled_f1(p, y, test["threshold"]), abs=1e-6)


@pytest.mark.slow
def test_eval_entry_point_reports_a_bad_checkpoint_in_one_line(tmp_path):
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("not a checkpoint\n")
    result = run_entry_point("eval", [f"ckpt_path={not_a_checkpoint}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2
    assert "is not a PyTorch file" in result.stderr and "Traceback" not in result.stderr + result.stdout


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """An untrained checkpoint of a small model trained (as recorded) on 4 synthetic images."""
    return write_checkpoint(tmp_path / "model.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path))


def test_metrics_json_is_written_last_so_an_interrupted_eval_has_none(tiny_checkpoint, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("retinaseg.eval.draw_plots", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(compose_config("eval", [f"ckpt_path={tiny_checkpoint}", "bootstrap=0"], tmp_path / "eval"))
    assert (tmp_path / "eval" / "per_image.csv").is_file() and not (tmp_path / "eval" / "metrics.json").exists()


def test_validation_images_of_another_dataset_are_refused(tiny_checkpoint, tmp_path):
    settings = [f"ckpt_path={tiny_checkpoint}", "split=val", "data=drive", "bootstrap=0"]
    with pytest.raises(ConfigError, match=r"split=val scores the validation images .* \(synthetic\), not images of "):
        evaluate(compose_config("eval", settings, tmp_path / "eval"))
