"""Bad inputs and settings: each is one clear message (what, which file, what to do), never a traceback."""

import gzip
import logging
import signal
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers.commands import run_module
from helpers.configs import TINY, TINY_SYNTHETIC
from helpers.datasets import make_drive, read_split, write_archive
from retinaseg.core.errors import ConfigError, DataError
from retinaseg.data import preprocess
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.data.sources import files


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
    assert "experiment=demo" in str(error.value)


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
        TINY + [f"data.root={drive}", "data.val_images=1", "test=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
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


def zip_of(drive, archive):
    """`drive` as a zip of DRIVE/... members, stored uncompressed (so that their bytes can be edited)."""
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(drive.rglob("*")):
            if path.is_file():
                z.write(path, f"DRIVE/{path.relative_to(drive)}")
    return archive


def edit_zip_headers(archive, name: str, local: dict[int, bytes], central: dict[int, bytes]):
    """Overwrite fields of member `name`'s local header and central directory entry (offset in the header: bytes)."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        start = z.getinfo(name).header_offset
    entry = next(
        at
        for at in range(len(data))
        if data[at : at + 4] == b"PK\x01\x02" and data[at + 46 : at + 46 + len(name)] == name.encode()
    )
    for header, fields in ((start, local), (entry, central)):
        for offset, value in fields.items():
            data[header + offset : header + offset + len(value)] = value
    archive.write_bytes(bytes(data))


MEMBER = "DRIVE/training/images/22_training.tif"


@pytest.mark.parametrize(
    "damage",
    [
        "encrypted",  # the flag bit 0 of `zip -e`
        "deflate64",  # compression method 9, which zipfile does not read
        "central-directory",  # the signature of its first entry overwritten
        "declared-size",  # a member that says it inflates to 2 GiB: a zip bomb
    ],
)
def test_a_zip_damaged_encrypted_or_in_another_compression_is_named(drive, tmp_path, damage):
    archive = zip_of(drive, tmp_path / "DRIVE.zip")
    if damage == "encrypted":
        edit_zip_headers(archive, MEMBER, {6: b"\x01\x00"}, {8: b"\x01\x00"})
    elif damage == "deflate64":
        edit_zip_headers(archive, MEMBER, {8: b"\x09\x00"}, {10: b"\x09\x00"})
    elif damage == "declared-size":
        edit_zip_headers(archive, MEMBER, {22: (2**31).to_bytes(4, "little")}, {24: (2**31).to_bytes(4, "little")})
    else:
        data = archive.read_bytes()
        archive.write_bytes(data.replace(b"PK\x01\x02", b"PK\x09\x09", 1))
    expected = f"{archive} is a damaged zip archive" if damage == "central-directory" else f"DRIVE.zip:{MEMBER}[: ]"
    with pytest.raises(DataError, match=expected) as error:
        read_split("drive", archive, "train")
    assert "BytesIO" not in str(error.value)
    if damage == "declared-size":
        assert "2,048 MiB, more than an image" in str(error.value)


def test_an_archive_member_that_inflates_past_an_images_bound_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_FILE_BYTES", 10_000)  # as if a member inflated to gigabytes
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 10_000)
    archive = write_archive(tmp_path / "stare-images.tar", {"im0001.ppm.gz": gzip.compress(bytes(20_000))})
    with pytest.raises(DataError, match=r"stare-images.tar:im0001.ppm.gz: it holds 0 MiB, more than an image"):
        files.Files(archive).read("im0001.ppm.gz")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (and whose pixel data is one short row)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "size, claimed",
    [((60000, 60000), "over 178,956,970"), ((10000, 10000), "10000x10000")],
    ids=["past-pil-and-opencv", "past-pil-warning"],
)
@pytest.mark.parametrize("path", ["images/22_training.tif", "1st_manual/22_manual1.gif", "mask/22_training_mask.gif"])
def test_an_image_claiming_too_many_pixels_is_refused_from_its_header(drive, path, size, claimed):
    (drive / "training" / path).write_bytes(png_claiming(*size))
    with pytest.raises(DataError, match=f"cannot read image .*{path}: its header claims {claimed} pixels"):
        read_split("drive", drive, "train")


def test_a_label_that_is_not_an_image_is_named_without_pythons_buffer(drive):
    (drive / "training" / "1st_manual" / "22_manual1.gif").write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(DataError, match="cannot read image .*22_manual1.gif: it is not a PNG") as error:
        read_split("drive", drive, "train")
    assert "BytesIO" not in str(error.value)


def palette(indices: np.ndarray, colours: list[int]) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(colours)
    return image


@pytest.mark.parametrize(
    "write",
    [
        lambda label: Image.fromarray(np.stack([label * 255, 0 * label, 0 * label], axis=-1)),  # red on black
        lambda label: palette(label, [0, 0, 0, 0, 0, 255]),  # a black/blue palette
        lambda label: Image.fromarray(label * 100),  # {0, 100}
        lambda label: Image.fromarray(label + 1),  # {1, 2}
        lambda label: palette(label, [4, 2, 4, 252, 254, 252]),  # DRIVE's 2nd_manual: raw 0/1, near black/white
    ],
    ids=["red-on-black", "black-blue-palette", "0-100", "1-2", "drive-2nd-manual"],
)
def test_a_two_valued_label_is_read_by_its_values_however_dark(drive, write):
    expected = read_split("drive", drive, "train")[0].label
    write(expected).save(drive / "training" / "1st_manual" / "21_manual1.png")
    (drive / "training" / "1st_manual" / "21_manual1.gif").unlink()
    label = read_split("drive", drive, "train")[0].label
    assert expected.any() and np.array_equal(label, expected)


def test_labels_without_a_vessel_pixel_do_not_train_or_score(drive):
    for number in (21, 22):
        Image.new("L", (40, 48), 0).save(drive / "training" / "1st_manual" / f"{number}_manual1.gif")
    dm = FundusDataModule(root=str(drive), val_images=1)
    with pytest.raises(DataError, match="none of the 1 train labels of data.dataset=drive .* holds a vessel pixel"):
        dm.setup("fit")
    with pytest.raises(DataError, match="none of the 2 all labels .* holds a vessel pixel"):
        dm.samples("all")


def test_a_symlink_cycle_under_the_root_is_skipped(drive, caplog):
    (drive / "training" / "images" / "loop").symlink_to(drive, target_is_directory=True)
    (drive / "training" / "self").symlink_to(".", target_is_directory=True)
    (drive / "one").mkdir()
    (drive / "two").mkdir()
    (drive / "one" / "two").symlink_to(drive / "two", target_is_directory=True)  # two folders linking to each other
    (drive / "two" / "one").symlink_to(drive / "one", target_is_directory=True)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the reader walks the cycle"))
    signal.alarm(20)
    try:
        with caplog.at_level(logging.WARNING):
            samples = read_split("drive", drive, "train")
    finally:
        signal.alarm(0)
    assert [s.id for s in samples] == ["21_training", "22_training"]
    assert "links back to" in caplog.text
