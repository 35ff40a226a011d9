"""retinaseg.evaluation.protocols, retinaseg.evaluation.literature and retinaseg.evaluation.calibration: other papers' ways of scoring on examples
small enough to count by hand, the published-results file, the table beside them, and the calibration error."""

import csv
import json

import numpy as np
import pytest

from helpers.commands import run_entry_point
from helpers.configs import compose_config
from retinaseg.compare import compare_with_literature
from retinaseg.core.errors import ConfigError, DataError
from retinaseg.data.sample import Sample
from retinaseg.evaluation import literature, protocols
from retinaseg.evaluation.calibration import Reliability
from retinaseg.evaluation.counts import Histograms
from retinaseg.evaluation.directory import EvaluationDirectory, EvaluationSettings
from retinaseg.evaluation.scoring import score

# Two images of 2x3 pixels; the FOV is the first two columns (4 pixels), the last column lies outside it.
PROBS = [np.array([[0.9, 0.2, 0.7], [0.6, 0.1, 0.3]]), np.array([[0.8, 0.1, 0.2], [0.4, 0.05, 0.2]])]
LABELS = [np.array([[1, 0, 0], [0, 1, 1]], bool), np.array([[1, 0, 0], [1, 0, 0]], bool)]
FOV = np.array([[1, 1, 0], [1, 1, 0]], bool)
# The round FOV of the DRIVE-like evaluations below.
FOV_64 = np.hypot(*(np.mgrid[:64, :64] - 32)) < 30


def hand_histograms() -> protocols.ImageHistograms:
    inside = Histograms.of([p[FOV] for p in PROBS], [t[FOV] for t in LABELS])
    outside = Histograms.of([p[~FOV] for p in PROBS], [t[~FOV] for t in LABELS])
    return protocols.ImageHistograms(("a", "b"), inside, outside)


def at(name: str, threshold: float = 0.5, pad_to=None) -> dict[str, float]:
    """Every metric of the example under protocol `name` at `threshold`."""
    protocol = protocols.Protocol.named(name, pad_to)
    histograms = hand_histograms().scored(protocol)
    index = protocols.threshold_index(histograms, threshold)
    scored = protocols.score(protocols.confusion_at(histograms, index), histograms, protocol.averaging, 0, 0)
    return {key: value.value for key, value in scored.items()}


def test_each_protocol_scores_the_hand_counted_example():
    # At 0.5, inside the FOV: image a tp 1 (0.9), fp 1 (0.6), fn 1 (0.1), tn 1 (0.2): F1 1/2;
    # image b tp 1 (0.8), fn 1 (0.4), tn 2: F1 2/3. Outside: a's 0.7 background, 0.3 vessel; b's 0.2 and 0.2.
    pooled = at("fov_pooled")
    assert pooled["f1"] == pytest.approx(4 / 7)  # tp 2, fp 1, fn 2, tn 3
    assert pooled["mcc"] == pytest.approx(4 / np.sqrt(3 * 4 * 4 * 5))
    assert pooled["miou"] == pytest.approx((2 / 5 + 3 / 6) / 2)
    assert pooled["mdice"] == pytest.approx((4 / 7 + 6 / 9) / 2)
    # Vessel probabilities 0.9, 0.1, 0.8, 0.4 against background 0.2, 0.6, 0.1, 0.05: 12 of 16 pairs in order,
    # and the tie 0.1 = 0.1 one half.
    assert pooled["auc"] == pytest.approx(12.5 / 16)
    mean = at("fov_mean_per_image")
    assert mean["f1"] == pytest.approx((1 / 2 + 2 / 3) / 2) and mean["accuracy"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert mean["auc"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    # Whole image: a gains a false positive (0.7) and a false negative (0.3), b two true negatives.
    whole = at("whole_image_pooled")
    assert whole["f1"] == pytest.approx(4 / 9) and whole["accuracy"] == pytest.approx(7 / 12)
    assert at("whole_image_mean_per_image")["f1"] == pytest.approx((2 / 6 + 2 / 3) / 2)
    # Multiplied by the FOV: outside pixels are predicted 0, so a's 0.7 becomes a true negative.
    multiplied = at("fov_multiplied_pooled")
    assert multiplied["f1"] == pytest.approx(4 / 8) and multiplied["accuracy"] == pytest.approx(8 / 12)
    assert at("fov_multiplied_mean_per_image")["f1"] == pytest.approx((2 / 5 + 2 / 3) / 2)
    # Zero padding to 3x4 adds 6 background pixels per image at probability 0: true negatives.
    padded = at("whole_image_pooled", pad_to=(3, 4))
    assert padded["f1"] == pytest.approx(4 / 9) and padded["accuracy"] == pytest.approx((7 + 12) / 24)
    # A threshold of 0.25 calls a's 0.3 (outside) and b's 0.4 vessel.
    assert at("whole_image_pooled", 0.25)["sensitivity"] == pytest.approx(4 / 5)
    with pytest.raises(DataError, match="more pixels than padding"):
        at("whole_image_pooled", pad_to=(2, 2))


def test_the_best_threshold_is_chosen_under_the_protocol():
    # Image 1 (small): a vessel pixel at 0.9, two background at 0.5. Image 2: vessels at 0.95 (5) and 0.4 (5),
    # background at 0.35. Above 0.5 image 1 is perfect (F1 1) and image 2 half found (2/3): mean 0.83, pooled
    # 0.71. From 0.4 up image 1 drops to 1/2, image 2 is perfect: mean 0.75, pooled 0.92.
    histograms = Histograms.of(
        [np.array([0.9, 0.5, 0.5]), np.array([0.95] * 5 + [0.4] * 5 + [0.35])],
        [np.array([1, 0, 0], bool), np.array([1] * 10 + [0], bool)],
    )
    per_image = protocols.edges(histograms)[protocols.best_f1_index(histograms, "mean_per_image")]
    pooled = protocols.edges(histograms)[protocols.best_f1_index(histograms, "pooled")]
    assert 0.5 < per_image <= 0.9 and 0.35 < pooled <= 0.4


def test_the_published_results_file_validates():
    results = literature.load_published()
    assert {r.dataset for r in results} == {"drive", "stare", "chase_db1", "hrf"}
    for r in results:
        assert r.source and r.protocol.region in protocols.REGIONS and r.threshold_text and r.metrics
    ids = {r.id for r in results}
    assert {"orobix-retina-unet", "vesselseg-pytorch-unet", "bob-unet-drive", "bob-lwnet-hrf-2336x3296"} <= ids
    assert {"mmseg-unet-fcn-ce-drive", "fsg-net-drive", "bob-second-annotator-drive"} <= ids


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source": None}, "lacks source"),
        ({"protocol": "fov"}, "unknown protocol 'fov'"),
        ({"threshold": "best"}, "neither a probability nor one of"),
        ({"metrics": {"dice": 0.8}}, "metric dice"),
        ({"colour": "red"}, "unknown keys colour"),
    ],
)
def test_a_broken_published_result_is_refused_by_name(tmp_path, change, message):
    entry = {
        "id": "x",
        "source": "a paper",
        "model": "U-Net",
        "dataset": "drive",
        "split": "test",
        "protocol": "fov_pooled",
        "threshold": 0.5,
        "metrics": {"f1": 0.8},
    }
    path = tmp_path / "published.yaml"
    path.write_text(json.dumps([{**entry, **change}]))
    with pytest.raises(DataError, match=f"entry x.*{message}"):
        literature.load_published(path)


def test_expected_calibration_error_of_a_hand_counted_example():
    # Bins of 1/15: 0.05 -> bin 0 (mean 0.05, 1 of 2 vessel), 0.95 -> bin 14 (2 of 2), 0.5 -> bin 7 (1 of 2).
    reliability = Reliability.of(np.array([0.05, 0.05, 0.95, 0.95, 0.5, 0.5]), np.array([0, 1, 1, 1, 1, 0]))
    assert reliability.count.sum() == 6 and reliability.count[[0, 7, 14]].tolist() == [2, 2, 2]
    assert reliability.ece == pytest.approx((2 * 0.45 + 2 * 0.05 + 2 * 0) / 6)
    assert Reliability.of(np.array([0.0, 1.0]), np.array([0, 1])).ece == 0


def write_drive_like_evaluation(directory, split: str, n: int, seed: int, checkpoint: str = "/m.ckpt"):
    """An evaluation directory as retinaseg.eval writes it, of n 64x64 images with a round FOV, as if of DRIVE."""
    rng = np.random.default_rng(seed)
    fov = FOV_64
    samples, probs = [], {}
    for i in range(n):
        label = rng.random((64, 64)) < 0.15
        image = np.zeros((64, 64, 3), np.uint8)
        samples.append(Sample(f"{i:02d}", image, label.astype(np.uint8), fov))
        logit = np.where(label, rng.normal(1.0, 1.5, label.shape), rng.normal(-2.5, 1.5, label.shape))
        probs[f"{i:02d}"] = (1 / (1 + np.exp(-logit))).astype(np.float32)
    ids = [s.id for s in samples]
    scores = score(ids, [probs[i] for i in ids], [s.label for s in samples], [fov] * n, 0.5, None, 50, 0)
    settings = EvaluationSettings(
        threshold=0.5, threshold_from="fixed", dataset="drive", split=split, n_images=n, checkpoint=checkpoint
    )
    EvaluationDirectory(directory).write_scores(scores, probs, samples)
    EvaluationDirectory(directory).write_metrics(scores.metrics, settings)
    return directory


def read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_the_table_of_a_drive_evaluation_lists_every_drive_result(tmp_path):
    test = write_drive_like_evaluation(tmp_path / "test", "test", 6, 0)
    train = write_drive_like_evaluation(tmp_path / "train", "train", 5, 1)
    with np.load(test / "histograms.npz") as saved:  # eval records the pixels outside the FOV too
        assert int(saved["outside_positive"].sum() + saved["outside_negative"].sum()) == 6 * int((~FOV_64).sum())
    cfg = compose_config(
        "compare", [f"a={test}", f"train={train}", "literature=true", "bootstrap=100"], tmp_path / "out"
    )
    compare_with_literature(cfg)
    rows = read_csv(tmp_path / "out" / "literature.csv")
    drive = {r.id for r in literature.load_published() if r.dataset == "drive"}
    assert {row["id"] for row in rows} == drive | {"diagnostic"}
    status = {row["id"]: row["status"] for row in rows}
    assert status["bob-unet-drive"] == "scored" and status["orobix-retina-unet"] == "scored"
    assert status["fsg-net-drive-auc"].startswith("not reproducible")
    assert status["diagnostic"] == "diagnostic, not a result"
    for row in rows:
        if row["status"] == "scored" and row["metric"] != "auc_pr":
            low, value, high = float(row["ci_low"]), float(row["model_value"]), float(row["ci_high"])
            assert low <= value <= high
            assert float(row["difference"]) == pytest.approx(value - float(row["published"]))
    markdown = (tmp_path / "out" / "literature.md").read_text()
    # The header and its rule, one row per published result, the diagnostic.
    assert markdown.count("\n| ") == 2 + len(drive) + 1
    assert "**diagnostic, not a result**" in markdown and "chosen on training images (" in markdown

    # Without the training images' evaluation, their rows say what to pass instead of a number.
    compare_with_literature(compose_config("compare", [f"a={test}", "literature=true"], tmp_path / "bare"))
    status = {row["id"]: row["status"] for row in read_csv(tmp_path / "bare" / "literature.csv")}
    assert "train=<run dir of retinaseg.eval split=train" in status["bob-unet-drive"]


def test_a_threshold_is_chosen_only_on_the_same_checkpoints_training_images(tmp_path):
    test = write_drive_like_evaluation(tmp_path / "test", "test", 3, 0)
    other = write_drive_like_evaluation(tmp_path / "other", "train", 3, 1, checkpoint="/other.ckpt")
    wrong_split = write_drive_like_evaluation(tmp_path / "val", "val", 3, 1)
    with pytest.raises(ConfigError, match="a threshold must be chosen for the model it is applied to"):
        literature.report(str(test), str(other), None, tmp_path / "out", 0, 0)
    with pytest.raises(ConfigError, match="scored split val: pass an evaluation of split=train"):
        literature.report(str(test), str(wrong_split), None, tmp_path / "out", 0, 0)


@pytest.mark.slow
def test_literature_entry_point_reports_a_missing_evaluation_in_one_line(tmp_path):
    result = run_entry_point("compare", ["literature=true", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2 and "a=<eval dir> is missing" in result.stderr


def test_a_threshold_chosen_on_validation_images_comes_from_the_validation_evaluation(tmp_path):
    test = write_drive_like_evaluation(tmp_path / "test", "test", 3, 0)
    val = write_drive_like_evaluation(tmp_path / "val", "val", 3, 1)
    entry = {"id": "v", "source": "a paper", "model": "U-Net", "dataset": "drive", "split": "test"}
    result = literature.parse(
        {**entry, "protocol": "fov_pooled", "threshold": "validation", "metrics": {"f1": 0.8}}, "test"
    )
    rows = literature.report(str(test), None, str(val), tmp_path / "out", 0, 0, published=[result])
    histograms = EvaluationDirectory(val).read("val").histograms.inside
    chosen = protocols.edges(histograms)[protocols.best_f1_index(histograms, "pooled")]
    assert rows[0].status == "scored" and rows[0].threshold == f"chosen on validation images ({chosen:.4f})"
    test_histograms = EvaluationDirectory(test).read("a").histograms.inside
    at_chosen = protocols.confusion_at(test_histograms, protocols.threshold_index(test_histograms, chosen))
    assert rows[0].values["f1"].value == pytest.approx(protocols.confusion_scores(at_chosen, np.ones(3))["f1"])


@pytest.mark.slow
def test_literature_table_of_a_drive_checkpoint_as_a_user_types_it(drive_root, drive_checkpoint, tmp_path):
    for split in ("test", "train"):
        args = [f"ckpt_path={drive_checkpoint}", f"data.root={drive_root}", f"split={split}", "plot_images=0"]
        result = run_entry_point("eval", [*args, "bootstrap=0", f"hydra.run.dir={tmp_path / split}"], tmp_path)
        assert result.returncode == 0, result.stderr
    train = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert train["split"] == "train" and train["n_images"] == 16  # DRIVE's 20 training images less 4 for validation
    args = [f"a={tmp_path / 'test'}", f"train={tmp_path / 'train'}", "literature=true", "bootstrap=200"]
    result = run_entry_point("compare", [*args, f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "out" / "literature.csv")
    assert {row["id"] for row in rows} == {r.id for r in literature.load_published() if r.dataset == "drive"} | {
        "diagnostic"
    }
    observer = next(row for row in rows if row["id"] == "bob-second-annotator-drive")
    # bob.ip.binseg's second annotator, 0.788 as its mean F1 per image, measured here the same way.
    assert "second observer measured here: F1 (Dice) 0.78" in observer["notes"]
