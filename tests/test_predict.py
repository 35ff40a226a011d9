"""retinaseg.predict on photographs of several formats, with given and estimated FOV masks; safe checkpoint loading."""

import csv
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

from helpers.checkpoints import write_checkpoint
from helpers.commands import run_entry_point
from helpers.configs import TINY_SYNTHETIC, compose_config
from helpers.datasets import encode, read_split
from retinaseg.core.errors import DataError
from retinaseg.data.preprocess import equalize_contrast, estimate_fov, normalize, read_mask, read_photograph
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.inference.settings import InferenceSettings
from retinaseg.model.checkpoint import load_checkpoint
from retinaseg.predict import predict


@pytest.fixture(scope="module")
def test_samples(drive_root):
    return read_split("drive", drive_root, "test")[:4]


@pytest.fixture(scope="module")
def photo_folder(test_samples, tmp_path_factory):
    """One DRIVE photograph as an RGB TIFF, an RGBA PNG and a 16-bit PNG; another, shrunk, as a grayscale
    JPEG; a text file beside them; and a folder of their FOV masks under two naming styles."""
    folder = tmp_path_factory.mktemp("photos")
    first, second = test_samples[0].image, test_samples[1].image
    bgr = cv2.cvtColor(first, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(folder / "rgb.tif"), bgr)
    cv2.imwrite(str(folder / "rgba.png"), cv2.cvtColor(first, cv2.COLOR_RGB2BGRA))
    cv2.imwrite(str(folder / "deep.png"), bgr.astype(np.uint16) * 257)
    small = cv2.resize(second, (400, 413), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(folder / "gray.jpg"), small[..., 1])
    (folder / "notes.txt").write_text("not a photograph\n")
    masks = folder.parent / f"{folder.name}_masks"
    masks.mkdir()
    fov = test_samples[0].fov.astype(np.uint8) * 255
    for stem in ("rgb_mask", "rgba_mask", "deep"):
        Image.fromarray(fov).save(masks / f"{stem}.png")
    small_fov = cv2.resize(test_samples[1].fov.astype(np.uint8), (400, 413), interpolation=cv2.INTER_NEAREST) * 255
    Image.fromarray(small_fov).save(masks / "gray_mask.gif")
    return folder, masks


def read(path) -> np.ndarray:
    return np.array(Image.open(path))


@pytest.mark.slow
def test_predict_entry_point_on_a_folder_of_formats(drive_checkpoint, photo_folder, test_samples, tmp_path):
    folder, _ = photo_folder
    out = tmp_path / "out"
    # threshold=0: every FOV pixel is vessel, so the masks show the FOV (the tiny model's vessels are faint).
    args = [f"ckpt_path={drive_checkpoint}", f"input={folder}", f"output_dir={out}", "threshold=0"]
    result = run_entry_point("predict", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "predict.log").read_text()
    assert "notes.txt" in log and "grayscale" in log and "alpha" in log and "16-bit" in log
    for stem, size in (("rgb", (584, 565)), ("rgba", (584, 565)), ("deep", (584, 565)), ("gray", (413, 400))):
        prob, mask, over = (read(out / f"{stem}_{kind}.png") for kind in ("prob", "mask", "overlay"))
        assert prob.shape == mask.shape == size and prob.dtype == mask.dtype == np.uint8 and over.shape == (*size, 3)
        assert set(np.unique(mask)) == {0, 255} and not (
            mask[:10, :10].any() or prob[:10, :10].any()
        )  # corners: outside the FOV
        assert (
            mask[size[0] // 2, size[1] // 2] == 255 and 0.5 < (mask > 0).mean() < 0.85
        )  # the estimated FOV, about DRIVE's
    # The same photograph read from an 8-bit TIFF, an RGBA PNG and a 16-bit PNG gives the same vessels.
    assert np.array_equal(read(out / "rgb_prob.png"), read(out / "rgba_prob.png"))
    assert np.array_equal(read(out / "rgb_prob.png"), read(out / "deep_prob.png"))


@pytest.mark.slow
def test_predict_with_given_fov_masks(drive_checkpoint, photo_folder, test_samples, tmp_path):
    folder, masks = photo_folder
    for fov, out in ((masks, tmp_path / "folder"), (masks / "gray_mask.gif", tmp_path / "file")):
        single = fov.is_file()
        overrides = [
            f"ckpt_path={drive_checkpoint}",
            f"input={folder / 'gray.jpg' if single else folder}",
            f"fov={fov}",
            f"output_dir={out}",
            "threshold=0",
        ]
        cfg = compose_config("predict", overrides, out)
        written = predict(cfg)
        assert len(written) == (1 if single else 4)
    given = read(masks / "gray_mask.gif") > 0
    for out in (tmp_path / "folder", tmp_path / "file"):
        prob, mask = read(out / "gray_prob.png"), read(out / "gray_mask.png")
        assert not prob[~given].any() and np.array_equal(mask > 0, given)


def test_a_photograph_and_its_mask_are_read_upright_as_their_exif_orientation_says(tmp_path):
    """Cameras store a portrait sideways with an EXIF orientation tag; photographs, labels and masks are read as
    viewers show them (retinaseg.data.preprocess, for predict and every dataset alike)."""
    image = np.zeros((40, 64, 3), np.uint8)
    image[:8, :16] = (250, 40, 40)  # a red corner tells every turn and flip apart
    for orientation in range(1, 9):
        path, mask_path = tmp_path / f"photo{orientation}.jpg", tmp_path / f"mask{orientation}.png"
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        Image.fromarray(image).save(path, exif=exif, quality=100)
        Image.fromarray((image[..., 0] > 0).astype(np.uint8) * 255).save(mask_path, exif=exif)
        with Image.open(path) as file:
            expected = np.array(ImageOps.exif_transpose(file).convert("RGB")).astype(int)
        got = read_photograph(path.read_bytes(), str(path))
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 16, orientation
        mask = read_mask(mask_path.read_bytes(), str(mask_path), str(path), got.shape)
        assert np.array_equal(mask, (got[..., 0] > 128).astype(np.uint8)), orientation


def test_estimated_fov_matches_drive_masks(test_samples):
    for s in test_samples:
        fov = estimate_fov(s.image)
        assert (fov & s.fov).sum() / (fov | s.fov).sum() > 0.98
    assert estimate_fov(np.full((50, 60, 3), 120, np.uint8)).all()  # no dark border: all of it


@pytest.mark.slow
def test_predict_equalises_photographs_like_the_checkpoint_was_trained(drive_checkpoint, test_samples, tmp_path):
    """A checkpoint trained with data.clahe=true gets its photographs contrast-equalised in predict too."""
    checkpoint = torch.load(drive_checkpoint, weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["clahe"] = True
    torch.save(checkpoint, tmp_path / "clahe.ckpt")
    image = test_samples[0].image
    Image.fromarray(image).save(tmp_path / "photo.png")
    for name in ("clahe", "plain"):
        ckpt = tmp_path / "clahe.ckpt" if name == "clahe" else drive_checkpoint
        predict(
            compose_config(
                "predict",
                [f"ckpt_path={ckpt}", f"input={tmp_path / 'photo.png'}", f"output_dir={tmp_path / name}"],
                tmp_path,
            )
        )
    clahe_checkpoint = load_checkpoint(tmp_path / "clahe.ckpt")
    module = clahe_checkpoint.build_module()
    preprocessing = clahe_checkpoint.preprocessing()
    assert preprocessing.clahe
    with torch.no_grad():
        x = normalize(equalize_contrast(image), preprocessing.mean, preprocessing.std)[None]
        expected = module.predictor.probabilities(x)[0, 0].numpy()
    fov = estimate_fov(image)
    got = read(tmp_path / "clahe" / "photo_prob.png").astype(float) / 255
    assert np.abs(got - expected * fov).max() <= 0.5 / 255 + 1e-6
    assert not np.array_equal(read(tmp_path / "clahe" / "photo_prob.png"), read(tmp_path / "plain" / "photo_prob.png"))


@pytest.mark.slow
def test_predict_errors_are_clear(drive_checkpoint, photo_folder, tmp_path):
    folder, masks = photo_folder

    def run(**settings):
        overrides = [
            f"{key}={value}"
            for key, value in {
                "ckpt_path": drive_checkpoint,
                "input": folder,
                "output_dir": tmp_path / "out",
                **settings,
            }.items()
        ]
        return predict(compose_config("predict", overrides, tmp_path))

    with pytest.raises(DataError, match="notes.txt is not a PNG, JPEG, TIFF, PPM, GIF or BMP"):
        run(input=folder / "notes.txt")
    broken = tmp_path / "broken.png"
    broken.write_text("not a png\n")
    with pytest.raises(DataError, match="cannot read .*broken.png"):
        run(input=broken)
    with pytest.raises(DataError, match="no FOV mask for deep.png"):
        run(fov=tmp_path)
    with pytest.raises(DataError, match="is 400x413 but .*rgb.tif is 565x584"):
        run(input=folder / "rgb.tif", fov=masks / "gray_mask.gif")
    with pytest.raises(DataError, match="is not a PyTorch file"):
        run(ckpt_path=folder / "notes.txt")


class Payload:
    """A class that unpickling would have to import and build: weights_only must refuse it."""


@pytest.mark.slow
def test_checkpoints_load_without_running_pickled_code(drive_checkpoint, tmp_path):
    checkpoint = load_checkpoint(drive_checkpoint)
    assert checkpoint.hyper_parameters["base_channels"] == 4 and "mean" in checkpoint.data
    checkpoint = torch.load(drive_checkpoint, weights_only=True)
    torch.save({**checkpoint, "extra": Payload()}, tmp_path / "pickled.ckpt")
    with pytest.raises(DataError, match=r"pickled objects .*Payload.*nothing in it was run"):
        load_checkpoint(tmp_path / "pickled.ckpt")
    torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(DataError, match="neither a retinaseg checkpoint nor a state_dict of the U-Net"):
        load_checkpoint(tmp_path / "other.ckpt")


def test_an_unreadable_photograph_in_a_folder_is_skipped_and_listed(tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(synthetic_samples(1, height=64, width=64)[0].image).save(folder / "good.png")
    (folder / "broken.png").write_text("not a png\n")
    ckpt = write_checkpoint(tmp_path / "model.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path / "unused"))

    def run(out):
        overrides = [f"ckpt_path={ckpt}", f"input={folder}", f"output_dir={out}"]
        return predict(compose_config("predict", overrides, tmp_path / "run"))

    with caplog.at_level(logging.WARNING, logger="retinaseg.inference.photographs"):
        assert run(tmp_path / "out") == [tmp_path / "out" / "good_mask.png"]
    assert any(r.getMessage().startswith("skipping broken.png: cannot read") for r in caplog.records)
    with open(tmp_path / "out" / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["photograph"], r["status"], r["mask"]) for r in rows] == [
        ("broken.png", "skipped", ""),
        ("good.png", "written", "good_mask.png"),
    ]
    assert "cannot read" in rows[0]["reason"] and rows[1]["reason"] == ""
    # With no photograph segmented the run fails, naming the first reason.
    (folder / "good.png").unlink()
    with pytest.raises(DataError, match="none of the 1 photographs .* could be segmented.*cannot read .*broken.png"):
        run(tmp_path / "again")
    assert not (tmp_path / "again" / "predictions.csv").exists()  # nothing blocks a rerun there


def test_predict_switches_to_sliding_windows_or_refuses_where_memory_is_short(tmp_path, monkeypatch, caplog):
    checkpoint = write_checkpoint(tmp_path / "tiny.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path))
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(synthetic_samples(1, height=96, width=96)[0].image, ".png"))

    def run(available: int, output: str):
        monkeypatch.setattr("retinaseg.inference.predictor.available_memory", lambda device: available)
        overrides = [f"ckpt_path={checkpoint}", f"input={photo}", f"output_dir={tmp_path / output}", "device=cpu"]
        return predict(compose_config("predict", overrides + ["inference.window=32"], tmp_path))

    whole = InferenceSettings(mode="whole").memory((96, 96), 4)
    with caplog.at_level(logging.WARNING):
        (mask,) = run(available=whole, output="sliding")  # the whole image needs more than half of it
    assert "using sliding windows of 32 px instead" in caplog.text and read(mask).shape == (96, 96)
    with pytest.raises(
        DataError,
        match=r"photo.png needs about .* MiB for inference at 96x96 even with sliding windows of 32 px.* scale=",
    ):
        run(available=whole // 20, output="refused")
