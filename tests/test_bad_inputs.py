"""Bad inputs and settings: each is one clear message (what, which file, what to do), never a traceback."""

import zipfile

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, TINY_SYNTHETIC, make_drive, read_split, run_module
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.errors import ConfigError, DataError


@pytest.fixture
def drive(tmp_path):
    return make_drive(tmp_path / "DRIVE")


def test_the_synthetic_layout_reads(drive):
    samples = read_split("drive", drive, "train")
    assert [s.id for s in samples] == ["21_training", "22_training"] and samples[0].image.shape == (48, 40, 3)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "missing", "no DRIVE dataset at data.root="),
        (lambda tmp: tmp, "does not have the DRIVE layout"),
        (
            lambda tmp: (tmp / "notes.txt").write_text("hi") and tmp / "notes.txt",
            "is a file but not a zip or tar archive",
        ),
    ],
    ids=["missing", "empty-folder", "not-a-zip"],
)
def test_a_root_that_is_not_drive_says_what_to_do(tmp_path, make, expected):
    with pytest.raises(DataError, match=expected) as error:
        read_split("drive", make(tmp_path), "train")
    assert "data=synthetic" in str(error.value)


def test_a_zip_without_the_drive_layout(tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("photos/01.png", b"not DRIVE")
    with pytest.raises(DataError, match="does not have the DRIVE layout: expected training/images/.*found photos/"):
        read_split("drive", archive, "train")


def test_a_damaged_member_of_a_drive_zip_is_named(drive, tmp_path):
    archive = tmp_path / "DRIVE.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(drive.rglob("*")):
            if path.is_file():
                z.write(path, f"DRIVE/{path.relative_to(drive)}")
    with zipfile.ZipFile(archive) as z:
        member = z.getinfo("DRIVE/training/images/22_training.tif")
    data = bytearray(archive.read_bytes())
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)  # the member's compressed bytes
    data[start + 20 : start + 60] = bytes(40)
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="DRIVE.zip:DRIVE/training/images/22_training.tif is damaged"):
        read_split("drive", archive, "train")


def test_a_missing_split_folder_is_named(drive):
    with pytest.raises(DataError, match=r"test/images is missing"):
        read_split("drive", drive, "test")


@pytest.mark.parametrize("folder, name", [("1st_manual", "22_manual1.gif"), ("mask", "22_training_mask.gif")])
def test_an_image_without_its_label_or_mask_is_named(drive, folder, name):
    (drive / "training" / folder / name).unlink()
    with pytest.raises(
        DataError,
        match=rf"22_training.tif has no {folder} file \(expected one named 22_\.\.\. in .*training/{folder}\)",
    ):
        read_split("drive", drive, "train")


@pytest.mark.parametrize(
    "folder, name, other",
    [
        ("1st_manual", "22_manual1.gif", "mask/22_training_mask.gif"),
        ("mask", "22_training_mask.gif", "1st_manual/22_manual1.gif"),
    ],
)
def test_a_label_or_mask_without_its_image_is_named(drive, folder, name, other):
    (drive / "training" / "images" / "22_training.tif").unlink()
    (drive / "training" / other).unlink()
    with pytest.raises(DataError, match=f"{folder} files without an image: .*{name}"):
        read_split("drive", drive, "train")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_image_is_named(drive, damage):
    path = drive / "training" / "images" / "22_training.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 1000)
    with pytest.raises(DataError, match="cannot read image .*22_training.tif.*Replace the file"):
        read_split("drive", drive, "train")


@pytest.mark.parametrize("folder, name", [("1st_manual", "21_manual1.gif"), ("mask", "21_training_mask.gif")])
def test_sizes_that_do_not_match_are_reported(drive, folder, name):
    Image.new("L", (30, 20), 255).save(drive / "training" / folder / name)
    with pytest.raises(DataError, match=f"{name} is 30x20 but its image 21_training.tif is 40x48"):
        read_split("drive", drive, "train")


def test_a_label_that_is_not_binary_reports_its_values(drive):
    label = np.zeros((48, 40), np.uint8)
    label[:10], label[10:20] = 128, 255
    Image.fromarray(label).save(drive / "training" / "1st_manual" / "21_manual1.gif")
    with pytest.raises(DataError, match=r"21_manual1.gif is not a binary mask: it holds 3 values \(0, 128, 255\)"):
        read_split("drive", drive, "train")


def test_palette_labels_read_as_the_same_binary_label(drive):
    expected = read_split("drive", drive, "train")[0].label
    palette = Image.fromarray(expected, mode="P")  # raw indices 0/1, as DRIVE's second observer
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.save(drive / "training" / "1st_manual" / "21_manual1.gif")
    assert Image.open(drive / "training" / "1st_manual" / "21_manual1.gif").mode == "P"
    assert np.array_equal(read_split("drive", drive, "train")[0].label, expected)


def test_an_empty_fov_mask_is_named(drive):
    Image.new("L", (40, 48), 0).save(drive / "training" / "mask" / "22_training_mask.gif")
    with pytest.raises(DataError, match="FOV mask .*22_training_mask.gif is empty"):
        read_split("drive", drive, "train")


def test_a_patch_larger_than_the_images(drive):
    dm = FundusDataModule(root=str(drive), val_images=1, patch_size=64)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="data.patch_size=64 is larger than image"):
        dm.train_dataloader()


# patch_size need not be a multiple of 2**depth: the U-Net pads any size (tests/test_model.py);
# val_images >= the number of images and batch_size < 1: tests/test_data.py; bad settings through every
# entry point: tests/test_settings.py.


@pytest.mark.slow
def test_a_bad_file_from_the_command_line_is_one_message_and_exit_2(drive, tmp_path):
    path = drive / "training" / "images" / "22_training.tif"
    path.write_bytes(path.read_bytes()[:300])
    result = run_module(
        TINY + [f"data.root={drive}", "data.val_images=1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert "cannot read image" in result.stderr and "22_training.tif" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_an_unknown_override_key_is_hydras_short_error(tmp_path):
    result = run_module(TINY_SYNTHETIC + ["data.patchsize=32", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not override 'data.patchsize'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
