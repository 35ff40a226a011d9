"""The model that comes with the package (retinaseg/pretrained/drive/, `ckpt_path=pretrained:drive`): its files in a
wheel, its card's hash and scores, predict without ckpt_path; packaging a checkpoint; the per-photograph quality
record (retinaseg.inference.quality)."""

import contextlib
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers.checkpoints import write_checkpoint
from helpers.commands import error_lines, run_entry_point
from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.core.errors import ConfigError, DataError
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.inference.binarise import Binarisation
from retinaseg.inference.quality import Range, References, assess
from retinaseg.model import checkpoint as checkpoints
from retinaseg.model.checkpoint import load_checkpoint
from retinaseg.package_model import package_model

ROOT = Path(__file__).resolve().parents[1]
DRIVE_MODEL = ROOT / "retinaseg" / "pretrained" / "drive"
CARD = (DRIVE_MODEL / "README.md").read_text()
PACKAGED = ("model.safetensors", "model.json", "README.md")


def card_value(metric: str) -> float:
    """The model's value of `metric` in the card's table of DRIVE test scores (the row `| <metric> | <value> ...`)."""
    found = re.search(rf"^\| {metric} \| ([0-9.]+) ", CARD, re.MULTILINE)
    assert found, f"no row for {metric} in the card"
    return float(found.group(1))


def test_weights_are_the_ones_the_card_names():
    weights = DRIVE_MODEL / "model.safetensors"
    found = re.search(r"SHA-256 of `model.safetensors`: `([0-9a-f]{64})`", CARD)
    assert found, "the card gives no SHA-256 of the weights"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == found.group(1)
    assert weights.stat().st_size <= 8_000_000


def test_a_built_wheel_carries_the_packaged_model(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT / "retinaseg", source / "retinaseg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("retinaseg-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"retinaseg/pretrained/drive/{name}" for name in PACKAGED} <= names
    # The configs travel with the package: an installed retinaseg composes its commands from any folder.
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "retinaseg" / "conf").rglob("*.yaml")}
    assert configs and configs | {"retinaseg/evaluation/published.yaml"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    composed = subprocess.run(
        [sys.executable, "-m", "retinaseg.eval", "--cfg", "job"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert composed.returncode == 0 and "task_name: eval" in composed.stdout, composed.stderr[-2000:]


def test_packaged_model_scores_on_drive_what_its_card_says(drive_root, tmp_path):
    from retinaseg.eval import evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        metrics = evaluate(
            compose_config(
                "eval",
                ["ckpt_path=pretrained:drive", f"data.root={drive_root}", "plot_images=0", "bootstrap=0"],
                tmp_path,
            )
        )
    assert metrics["checkpoint"] == "pretrained:drive" and metrics["n_images"] == 20
    assert metrics["f1"] == pytest.approx(card_value("F1"), abs=1e-4)
    assert metrics["auc"] == pytest.approx(card_value("AUC"), abs=1e-4)


def test_predict_without_ckpt_path_uses_the_packaged_model(drive_root, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(drive_root / "test" / "images" / "01_test.tif", photos / "drive.tif")
    (synthetic,) = synthetic_samples(1, height=300, width=400, seed=3)
    cv2.imwrite(str(photos / "synthetic.png"), cv2.cvtColor(synthetic.image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    result = run_entry_point("predict", [f"input={photos}", f"output_dir={out}"], tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert len(re.findall("no ckpt_path given: using .*ckpt_path=pretrained:drive", log)) == 1
    for stem in ("drive", "synthetic"):
        assert (out / f"{stem}_overlay.png").is_file() and (out / f"{stem}_mask.png").is_file()
    rows = {row["photograph"]: row for row in csv.DictReader((out / "predictions.csv").open())}
    assert set(rows) == {"drive.tif", "synthetic.png"}
    drive, drawn = rows["drive.tif"], rows["synthetic.png"]
    assert drive["fov"] == "estimated" and 0.6 < float(drive["fov_fraction"]) < 0.75
    # A DRIVE photograph sits inside the ranges of DRIVE's training photographs; the drawn one, a third smaller
    # than DRIVE's, does not, and says by how much to scale it.
    assert drive["warnings"] == ""
    assert "pass scale=" in drawn["warnings"]
    assert all(row["training_brightness"] != "unknown" for row in rows.values())
    # One log line per photograph, whether it warns or not.
    assert re.search(r"drive\.tif: FOV estimated .* all within the ranges", log)
    assert re.search(r"synthetic\.png: \d+ warning\(s\): .*pass scale=", log)


@pytest.mark.slow
def test_an_unknown_packaged_model_is_one_error_naming_the_known_ones(tmp_path):
    (photo,) = synthetic_samples(1, height=64, width=64)
    cv2.imwrite(str(tmp_path / "photo.png"), photo.image)
    result = run_entry_point(
        "predict",
        [f"input={tmp_path / 'photo.png'}", "ckpt_path=pretrained:stare", f"output_dir={tmp_path / 'out'}"],
        tmp_path,
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "pretrained:stare" in line and "pretrained:drive" in line


@pytest.fixture
def packaged_tiny(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A tiny synthetic checkpoint and its packaged model `pretrained:tiny` (PRETRAINED_DIR moved to tmp_path)."""
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path))
    monkeypatch.setattr(checkpoints, "PRETRAINED_DIR", tmp_path / "pretrained")
    package_model(
        compose_config("package_model", [f"ckpt_path={ckpt}", f"folder={tmp_path / 'pretrained' / 'tiny'}"], tmp_path)
    )
    return ckpt, tmp_path / "pretrained" / "tiny"


def test_a_packaged_checkpoint_predicts_as_the_checkpoint(packaged_tiny, tmp_path):
    ckpt, folder = packaged_tiny
    original, packaged = load_checkpoint(ckpt), load_checkpoint("pretrained:tiny")
    assert packaged.name == "pretrained:tiny" and packaged.path == folder / "model.safetensors"
    assert packaged.preprocessing() == original.preprocessing() and not packaged.resumable
    assert packaged.data["root"] is None  # a folder of the training machine is not packaged
    x = torch.rand(1, 3, 64, 48)
    torch.testing.assert_close(
        packaged.build_module().predictor.probabilities(x), original.build_module().predictor.probabilities(x)
    )
    # The ranges come from the training photographs (4 synthetic ones, 1 of them held out for validation).
    ref = packaged.references
    assert ref.dataset == "synthetic" and ref.images == 4
    assert 0 < ref.brightness.low <= ref.brightness.high < 255 and ref.fov_width.low < ref.fov_width.high
    with pytest.raises(ConfigError, match="model.safetensors exists and is not overwritten"):
        package_model(compose_config("package_model", [f"ckpt_path={ckpt}", f"folder={folder}"], tmp_path))
    with pytest.raises(ConfigError, match="no packaged model of that name; the packaged models are pretrained:tiny"):
        load_checkpoint("pretrained:../tiny")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(DataError, match="the files of pretrained:tiny, cannot be read .*reinstall retinaseg"):
        load_checkpoint("pretrained:tiny")


def test_a_packaged_model_keeps_the_binarisation_it_is_given(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path))
    monkeypatch.setattr(checkpoints, "PRETRAINED_DIR", tmp_path / "pretrained")
    overrides = [
        f"ckpt_path={ckpt}",
        f"folder={tmp_path / 'pretrained' / 'tiny'}",
        "min_size=50",
        "hysteresis=0.7",
        "bridge=2",
    ]
    package_model(compose_config("package_model", overrides, tmp_path))
    packaged = load_checkpoint("pretrained:tiny").predictor(torch.device("cpu"))
    assert packaged.binarisation == Binarisation(0.5, 0.7, 50, 2.0)
    # Unset, the checkpoint's own (none) is kept.
    assert load_checkpoint(ckpt).predictor(torch.device("cpu")).binarisation.plain
    unset = [f"ckpt_path={ckpt}", f"folder={tmp_path / 'pretrained' / 'unset'}"]
    package_model(compose_config("package_model", unset, tmp_path))
    assert load_checkpoint("pretrained:unset").predictor(torch.device("cpu")).binarisation.plain
    with pytest.raises(ConfigError, match="min_size must be an integer >= 0"):
        overrides = [f"ckpt_path={ckpt}", f"folder={tmp_path / 'other'}", "min_size=-1"]
        package_model(compose_config("package_model", overrides, tmp_path))


REFERENCE = References(
    "drive",
    20,
    brightness=Range(80.0, 150.0),
    contrast=Range(0.11, 0.35),
    vessel_density=Range(0.09, 0.14),
    fov_width=Range(480.0, 600.0),
)


def photograph(size: int = 540) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A reddish disc of brightness ~90 and contrast ~0.2 on black, its FOV, and a mask of 10% of it as vessels."""
    rng = np.random.default_rng(0)
    image = np.zeros((size + 40, size + 40, 3), np.uint8)
    fov = np.zeros(image.shape[:2], np.uint8)
    cv2.circle(fov, (size // 2 + 20, size // 2 + 20), size // 2, 1, -1)
    fov = fov.astype(bool)
    image[fov] = np.clip(rng.normal(100, 20, (fov.sum(), 1)) * [1.4, 0.8, 0.4], 0, 255).astype(np.uint8)
    mask = fov & (rng.random(fov.shape) < 0.1)
    return image, fov, mask


def test_a_photograph_like_the_training_ones_has_no_warnings():
    image, fov, mask = photograph()
    quality = assess(image, fov, False, mask, 1.0, REFERENCE)
    assert quality.warnings == [] and quality.fov_width == 541  # a circle of radius 270
    assert "all within the ranges" in quality.summary()
    row = quality.row()
    assert row["fov"] == "estimated" and row["training_brightness"] == "80.0-150.0" and row["warnings"] == ""


def test_each_value_out_of_range_is_a_warning_in_words():
    image, fov, mask = photograph()
    dark = (image * 0.4).astype(np.uint8)
    (warning,) = assess(dark, fov, True, mask, 1.0, REFERENCE).warnings
    assert warning.startswith("brightness 36.7") and "below the range of the model's 20 training photographs" in warning
    flat = np.where(fov[..., None], [140, 80, 40], 0).astype(np.uint8)
    assert assess(flat, fov, True, mask, 1.0, REFERENCE).warnings == [
        "contrast 0.000 is below the range of the model's 20 training photographs (drive), 0.110-0.350"
    ]
    (warning,) = assess(image, fov, True, fov, 1.0, REFERENCE).warnings
    assert warning.startswith("vessel density 1.000 is above")
    big, big_fov, big_mask = photograph(1080)
    (warning,) = assess(big, big_fov, True, big_mask, 1.0, REFERENCE).warnings
    assert "1081 px wide at scale 1 but 480-600 px in training" in warning and warning.endswith("pass scale=0.5")
    assert assess(big, big_fov, True, big_mask, 0.5, REFERENCE).warnings == []
    gray = image[..., :1].repeat(3, axis=2)
    assert assess(gray, fov, True, mask, 1.0, REFERENCE).warnings == [
        "the photograph is grayscale, but the model was trained on colour photographs"
    ]
    everywhere = np.ones(fov.shape, bool)
    assert "no field of view stands out" in assess(image, everywhere, False, mask, 1.0, REFERENCE).warnings[0]


def test_without_reference_ranges_they_are_unknown_not_invented():
    image, fov, mask = photograph()
    quality = assess((image * 0.2).astype(np.uint8), fov, False, mask, 1.0, None)
    assert quality.warnings == []
    assert {
        quality.row()[f"training_{name}"] for name in ("brightness", "contrast", "vessel_density", "fov_width")
    } == {"unknown"}
    assert "not checked" in quality.summary() and "unknown" in quality.summary()
