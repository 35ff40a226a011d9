"""The dataset readers on tiny fixtures in each dataset's exact layout and file formats (built here from synthetic
photographs): names, official splits, FOV given or estimated, second observers, archives read as distributed,
and the errors a wrong or damaged copy gets."""

import gzip
import logging
import re
import tarfile
import zipfile

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from helpers.commands import run_module
from helpers.configs import CONF, TINY
from helpers.datasets import (
    chase_names,
    encode,
    make_chase,
    make_folder,
    make_hrf,
    make_stare,
    mask_file,
    read_split,
    write_archive,
)
from retinaseg.core.errors import DataError
from retinaseg.data import sources
from retinaseg.data.preprocess import estimate_fov
from retinaseg.data.sample import Sample
from retinaseg.data.sources.synthetic import synthetic_samples


@pytest.fixture(scope="module")
def photos() -> list[Sample]:
    """Four small synthetic photographs, each with a second observer (its label with a few pixels changed)."""
    samples = synthetic_samples(4, seed=7, height=72, width=80)
    for s in samples:
        second = s.label.copy()
        second[30:34, 30:34] ^= 1
        s.second_label = second
    return samples


def jpeg_like(image: np.ndarray, decoded: np.ndarray) -> bool:
    """The decoded JPEG is the photograph up to compression error."""
    return decoded.shape == image.shape and np.abs(decoded.astype(int) - image).mean() < 4


def test_stare_tars_of_gzipped_ppms(photos, tmp_path, caplog):
    names = ["im0001", "im0005", "im0162", "im0324"]
    root = make_stare(tmp_path / "STARE", photos, names)
    with caplog.at_level(logging.DEBUG):
        catalogue = sources.open_dataset("stare", root)
    # The unlabelled photograph of the image tar (im0400) is not part of the dataset.
    assert catalogue.ids("all") == names
    assert catalogue.ids("train") == ["im0001", "im0005"] and catalogue.ids("test") == ["im0162", "im0324"]
    samples = list(catalogue.read(names))
    for s, photo in zip(samples, photos, strict=True):
        assert np.array_equal(s.image, photo.image)  # PPM is lossless
        assert np.array_equal(s.label, photo.label) and np.array_equal(s.second_label, photo.second_label)
        assert not s.fov_given and np.array_equal(s.fov, estimate_fov(photo.image))


def test_stare_unpacked_folders_read_the_same(photos, tmp_path):
    names = ["im0002", "im0239"]
    packed = make_stare(tmp_path / "packed", photos[:2], names)
    unpacked = tmp_path / "unpacked"
    for part in ("stare-images", "labels-ah", "labels-vk"):
        with tarfile.open(packed / f"{part}.tar") as archive:
            for member in archive.getmembers():
                data = archive.extractfile(member).read()
                # Half of the files gunzipped, as FR-UNet's and bob.ip.binseg's copies are.
                if member.name.startswith("im0002"):
                    name, data = member.name[:-3], gzip.decompress(data)
                else:
                    name = member.name
                (unpacked / part).mkdir(parents=True, exist_ok=True)
                (unpacked / part / name).write_bytes(data)
    for a, b in zip(read_split("stare", packed, "all"), read_split("stare", unpacked, "all"), strict=True):
        assert a.id == b.id and np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert np.array_equal(a.second_label, b.second_label)


def test_stare_tars_made_from_a_folder_with_dot_slash_names(photos, tmp_path):
    root = make_stare(tmp_path / "STARE", photos[:2], ["im0001", "im0002"])
    with tarfile.open(root / "labels-ah.tar") as archive:
        members = {f"./{m.name}": archive.extractfile(m).read() for m in archive.getmembers()}
    write_archive(root / "labels-ah.tar", members)
    assert [s.id for s in read_split("stare", root, "all")] == ["im0001", "im0002"]


def test_stare_without_labels_vk_has_no_second_observer(photos, tmp_path):
    root = make_stare(tmp_path / "STARE", photos[:2], ["im0001", "im0002"])
    (root / "labels-vk.tar").unlink()
    assert all(s.second_label is None for s in read_split("stare", root, "all"))


def test_chase_db1_flat_zip(photos, tmp_path):
    names = ["Image_01L", "Image_10R", "Image_11L", "Image_14R"]
    path = make_chase(tmp_path / "CHASEDB1.zip", photos, names)
    catalogue = sources.open_dataset("chase_db1", path)
    assert catalogue.ids("train") == names[:2] and catalogue.ids("test") == names[2:]
    for s, photo in zip(catalogue.read(names), photos, strict=True):
        assert jpeg_like(photo.image, s.image)
        assert np.array_equal(s.label, photo.label) and np.array_equal(s.second_label, photo.second_label)
        assert not s.fov_given and np.array_equal(s.fov, estimate_fov(s.image))


def test_chase_db1_split_is_children_1_to_10_for_training():
    assert chase_names(28)[19] == "Image_10R"  # the first 20 of the 28 photographs are children 01-10


def test_hrf_all_zip_with_tif_labels_rgb_masks_and_mixed_case_jpg(photos, tmp_path):
    names = ["01_dr", "05_h", "06_g", "15_dr"]
    path = make_hrf(tmp_path / "all.zip", photos, names)
    catalogue = sources.open_dataset("hrf", path)
    assert catalogue.ids("train") == ["01_dr", "05_h"] and catalogue.ids("test") == ["06_g", "15_dr"]
    for s, photo in zip(catalogue.read(names), photos, strict=True):
        assert jpeg_like(photo.image, s.image)
        assert np.array_equal(s.label, photo.label) and np.array_equal(s.fov, photo.fov)
        assert s.fov_given and s.second_label is None


def test_folder_pairs_by_leading_name_in_any_format(photos, tmp_path, caplog):
    root = tmp_path / "mine"
    make_folder(root, photos[:2], masks=False)  # synthetic_000.png with synthetic_000_label.png
    images, labels = root / "train" / "images", root / "train" / "labels"
    # c: a 16-bit grayscale TIFF photograph with c.png as its label; d: RGBA with d_vessels.gif; e: no label.
    gray16 = photos[2].image[..., 1].astype(np.uint16) * 257
    cv2.imwrite(str(images / "c.tif"), gray16)
    (labels / "c.png").write_bytes(encode(mask_file(photos[2].label), ".png"))
    cv2.imwrite(str(images / "d.png"), cv2.cvtColor(photos[3].image, cv2.COLOR_RGB2BGRA))
    (labels / "d_vessels.gif").write_bytes(encode(mask_file(photos[3].label), ".gif"))
    cv2.imwrite(str(images / "e.jpg"), photos[0].image)
    (images / "notes.txt").write_text("not an image\n")
    with caplog.at_level(logging.WARNING):
        samples = read_split("folder", root, "train")
    assert [s.id for s in samples] == ["c", "d", "synthetic_000", "synthetic_001"]
    assert "e.jpg" in caplog.text and "no label" in caplog.text and "notes.txt" in caplog.text
    c, d = samples[0], samples[1]
    assert np.array_equal(c.image, np.repeat(photos[2].image[..., 1:2], 3, axis=2)) and "grayscale" in caplog.text
    assert np.array_equal(d.image, photos[3].image) and np.array_equal(d.label, photos[3].label)
    assert not any(s.fov_given for s in samples)
    with pytest.raises(DataError, match="test/images is missing: data=folder tests on <root>/test/images"):
        read_split("folder", root, "test")


def test_folder_photographs_of_the_same_name_are_refused(photos, tmp_path):
    root = make_folder(tmp_path / "mine", photos[:1], masks=False)
    (root / "train" / "images" / "synthetic_000.jpg").write_bytes(encode(photos[0].image, ".jpg"))
    with pytest.raises(DataError, match="holds several photographs named synthetic_000 .*rename them apart"):
        sources.open_dataset("folder", root)


def test_folder_names_keep_their_dots(photos, tmp_path):
    root = tmp_path / "mine"
    for folder, suffix, write in (
        ("images", "", lambda s: s.image),
        ("labels", "_label", lambda s: mask_file(s.label)),
    ):
        (root / "train" / folder).mkdir(parents=True)
        for name, s in (("tr.v1", photos[0]), ("tr.v2", photos[1])):
            (root / "train" / folder / f"{name}{suffix}.png").write_bytes(encode(write(s), ".png"))
    samples = read_split("folder", root, "train")
    assert [s.id for s in samples] == ["tr.v1", "tr.v2"]
    assert all(np.array_equal(s.label, p.label) for s, p in zip(samples, photos[:2]))


@pytest.mark.parametrize("content", ["notes", "nothing", "zip-entry", "tar-entry"])
def test_a_masks_folder_without_images_is_refused(photos, tmp_path, content):
    root = make_folder(tmp_path / "mine", photos[:2], masks=False)
    (root / "train" / "masks").mkdir()
    if content == "notes":
        (root / "train" / "masks" / "notes.txt").write_text("masks to come\n")
    elif content == "zip-entry":  # `zip -r` stores the empty folder as an entry of its own
        with zipfile.ZipFile(tmp_path / "mine.zip", "w") as archive:
            for path in sorted(root.rglob("*")):
                archive.write(path, path.relative_to(tmp_path).as_posix())
        root = tmp_path / "mine.zip"
    elif content == "tar-entry":
        with tarfile.open(tmp_path / "mine.tar", "w") as archive:
            archive.add(root, "mine")
        root = tmp_path / "mine.tar"
    with pytest.raises(DataError, match="train/masks holds no images: add the FOV masks, or remove the folder"):
        sources.open_dataset("folder", root)


def test_folder_masks_and_test_split(photos, tmp_path):
    root = make_folder(make_folder(tmp_path / "mine", photos[:2]), photos[2:], split="test")
    train, test = read_split("folder", root, "train"), read_split("folder", root, "test")
    assert [s.id for s in train] == [p.id for p in photos[:2]] and len(test) == 2
    assert all(s.fov_given and np.array_equal(s.fov, p.fov) for s, p in zip(train + test, photos, strict=True))


def test_folder_zip(photos, tmp_path):
    folder = make_folder(tmp_path / "mine", photos[:2])
    members = {str(p.relative_to(tmp_path)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    archive = write_archive(tmp_path / "mine.zip", members)
    for a, b in zip(read_split("folder", folder, "train"), read_split("folder", archive, "train"), strict=True):
        assert a.id == b.id and np.array_equal(a.image, b.image) and np.array_equal(a.fov, b.fov)


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("stare", "does not have the STARE layout: expected stare-images.tar .*; found holiday/, notes.txt"),
        ("chase_db1", "does not have the CHASE_DB1 layout: expected Image_NN.*; found holiday/, notes.txt"),
        ("hrf", "does not have the HRF layout: expected images/NN_dr.JPG.*; found holiday/, notes.txt"),
        ("folder", "does not have the folder layout: found holiday/, notes.txt"),
        ("drive", "does not have the DRIVE layout: expected training/images/.*; found holiday/, notes.txt"),
    ],
)
def test_a_root_of_another_layout_names_what_was_expected_and_found(tmp_path, dataset, expected):
    (tmp_path / "holiday").mkdir()
    (tmp_path / "holiday" / "beach.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DataError, match=expected):
        sources.open_dataset(dataset, tmp_path)


def test_unpaired_files_are_named(photos, tmp_path):
    root = make_stare(tmp_path / "STARE", photos[:2], ["im0001", "im0002"])
    write_archive(root / "stare-images.tar", {"im0001.ppm.gz": gzip.compress(encode(photos[0].image, ".ppm"))})
    with pytest.raises(DataError, match=r"labels-ah files without an image: .*labels-ah.tar:im0002.ah.ppm.gz"):
        sources.open_dataset("stare", root)
    names = chase_names(2)
    members = {
        f"{names[0]}.jpg": encode(photos[0].image, ".jpg"),
        f"{names[1]}_1stHO.png": encode(photos[1].label, ".png"),
    }
    write_archive(tmp_path / "c.zip", members)
    with pytest.raises(DataError, match=r"1stHO label files without an image: .*c.zip:Image_01R_1stHO.png"):
        sources.open_dataset("chase_db1", tmp_path / "c.zip")
    write_archive(tmp_path / "c.zip", {f"{names[0]}.jpg": encode(photos[0].image, ".jpg")})
    with pytest.raises(
        DataError, match=r"image .*c.zip:Image_01L.jpg has no 1stHO label file \(expected Image_01L_1stHO.png"
    ):
        sources.open_dataset("chase_db1", tmp_path / "c.zip")


def test_stare_labels_20_of_its_photographs_10_train_10_test(photos, tmp_path):
    labelled = ["im0001", "im0002", "im0003", "im0004", "im0005", "im0044", "im0077", "im0081", "im0082", "im0139"]
    labelled += ["im0162", "im0163", "im0235", "im0236", "im0239", "im0240", "im0255", "im0291", "im0319", "im0324"]
    root = make_stare(tmp_path / "STARE", [photos[k % 4] for k in range(20)], labelled, unlabelled=3)
    catalogue = sources.open_dataset("stare", root)
    assert catalogue.ids("train") == labelled[:10] and catalogue.ids("test") == labelled[10:]
    # One of the 20 without its label is named, not left out.
    with tarfile.open(root / "labels-ah.tar") as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if "im0044" not in m.name}
    write_archive(root / "labels-ah.tar", members)
    with pytest.raises(DataError, match=r"image .*stare-images.tar:im0044.ppm.gz has no labels-ah file"):
        sources.open_dataset("stare", root)


def test_hrf_unpaired_files_are_named(photos, tmp_path):
    path = make_hrf(tmp_path / "all.zip", photos[:2], ["01_dr", "01_g"])
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    write_archive(path, {k: v for k, v in members.items() if k != "manual1/01_g.tif"})
    with pytest.raises(
        DataError, match=r"image .*all.zip:images/01_g.jpg has no manual1 file \(expected manual1/01_g.tif\)"
    ):
        sources.open_dataset("hrf", path)
    write_archive(path, {k: v for k, v in members.items() if k != "mask/01_dr_mask.tif"})
    with pytest.raises(
        DataError, match=r"image .*all.zip:images/01_dr.JPG has no mask file \(expected mask/01_dr_mask.tif\)"
    ):
        sources.open_dataset("hrf", path)
    write_archive(path, {k: v for k, v in members.items() if k != "images/01_dr.JPG"})
    with pytest.raises(DataError, match=r"manual1 files without an image: .*all.zip:manual1/01_dr.tif"):
        sources.open_dataset("hrf", path)


def test_a_second_observer_missing_for_some_images_is_named(photos, tmp_path):
    path = make_chase(tmp_path / "CHASEDB1.zip", photos[:2], ["Image_01L", "Image_01R"])
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != "Image_01R_2ndHO.png"}
    write_archive(path, members)
    with pytest.raises(DataError, match=r"image\(s\) .*Image_01R.jpg have no second observer's label"):
        sources.open_dataset("chase_db1", path)


def test_a_damaged_archive_member_is_named(photos, tmp_path):
    root = make_stare(tmp_path / "STARE", photos[:2], ["im0001", "im0002"])
    good = gzip.compress(encode(photos[1].image, ".ppm"))
    write_archive(
        root / "stare-images.tar",
        {"im0001.ppm.gz": gzip.compress(encode(photos[0].image, ".ppm")), "im0002.ppm.gz": good[: len(good) // 2]},
    )
    catalogue = sources.open_dataset("stare", root)
    assert next(catalogue.read(["im0001"])).id == "im0001"
    with pytest.raises(DataError, match=r"stare-images.tar:im0002.ppm.gz is damaged"):
        list(catalogue.read(["im0002"]))
    (root / "labels-ah.tar").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="labels-ah.tar is a file but not a zip or tar archive"):
        sources.open_dataset("stare", root)


@pytest.mark.parametrize("dataset", sorted(sources.READERS))
def test_each_dataset_config_takes_its_root_from_the_readers_environment_variable(dataset, monkeypatch):
    variable = sources.root_env(dataset)
    if variable:
        monkeypatch.setenv(variable, "/somewhere/else")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"data={dataset}"])
    assert cfg.data.dataset == dataset and cfg.data.root == ("/somewhere/else" if variable else None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, expected",
    [
        ("root", "does not have the STARE layout: expected stare-images.tar .*STARE_ROOT"),
        ("label", "image .*stare-images.tar:im0003.ppm.gz has no labels-ah file"),
        ("member", "stare-images.tar:im0002.ppm.gz is damaged"),
    ],
)
def test_a_wrong_or_damaged_copy_stops_training_with_one_line_and_exit_2(photos, tmp_path, fault, expected):
    names = ["im0001", "im0002", "im0003", "im0004", "im0162"]
    photographs = [photos[k % 4] for k in range(len(names))]
    root = make_stare(tmp_path / "STARE", photographs, names, unlabelled=0)
    if fault == "root":  # the folder above the dataset
        root = tmp_path
    elif fault == "label":
        with tarfile.open(root / "labels-ah.tar") as archive:
            labels = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if "im0003" not in m.name}
        write_archive(root / "labels-ah.tar", labels)
    else:  # a truncated member of the image tar
        images = {f"{n}.ppm.gz": gzip.compress(encode(p.image, ".ppm")) for n, p in zip(names, photographs)}
        images["im0002.ppm.gz"] = images["im0002.ppm.gz"][:100]
        write_archive(root / "stare-images.tar", images)
    result = run_module(TINY + ["data=stare", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.search(expected, line), line
