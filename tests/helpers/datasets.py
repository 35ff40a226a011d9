"""Small datasets in the exact layouts and file formats of DRIVE, STARE, CHASE_DB1, HRF and `folder` (built from
the images given), the image and archive files they are made of, and reading a dataset's split back."""

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from retinaseg.data import sources
from retinaseg.data.sample import Sample
from retinaseg.data.sources.stare import LABELLED as STARE_LABELLED
from retinaseg.data.sources.synthetic import synthetic_samples


def read_split(dataset: str, root, split: str) -> list[Sample]:
    """Every Sample of a dataset's official split ("train", "test") or of "all" its labelled images."""
    catalogue = sources.open_dataset(dataset, root)
    return list(catalogue.read(catalogue.ids(split)))


def encode(array: np.ndarray, suffix: str, **params) -> bytes:
    """An RGB or grayscale uint8 array as the bytes of an image file (PIL's encoders)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=Image.registered_extensions()[suffix.lower()], **params)
    return buffer.getvalue()


def mask_file(mask: np.ndarray, rgb: bool = False) -> np.ndarray:
    """A {0, 1} mask as the 0/255 image the datasets store (grayscale, or R=G=B)."""
    gray = (np.asarray(mask) > 0).astype(np.uint8) * 255
    return np.stack([gray] * 3, axis=-1) if rgb else gray


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    """A .zip or .tar holding `members` (name: bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(path, "w") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


# DRIVE's file names in each folder of a split ("training", "test"), for image number `n`.
DRIVE_FILES = {
    "images": "{n:02d}_{split}.tif",
    "1st_manual": "{n:02d}_manual1.gif",
    "2nd_manual": "{n:02d}_manual2.gif",
    "mask": "{n:02d}_{split}_mask.gif",
}


def drive_file(root: Path, split: str, folder: str, number: int) -> Path:
    """The path of DRIVE image `number`'s file in `folder` of `split` under `root`."""
    return root / split / folder / DRIVE_FILES[folder].format(n=number, split=split)


def make_drive(root: Path, numbers=(21, 22), split: str = "training", size=(48, 40)) -> Path:
    """A DRIVE-layout folder (tif images, gif labels and masks, DRIVE's names) of small synthetic images."""
    for folder in ("images", "1st_manual", "mask"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for number, s in zip(numbers, synthetic_samples(len(numbers), height=size[0], width=size[1])):
        Image.fromarray(s.image).save(drive_file(root, split, "images", number))
        Image.fromarray(s.label * 255).save(drive_file(root, split, "1st_manual", number))
        Image.fromarray(s.fov.astype(np.uint8) * 255).save(drive_file(root, split, "mask", number))
    return root


def link_drive(drive_root: Path, root: Path, split: str, numbers, folders=("images", "1st_manual", "mask")) -> Path:
    """A DRIVE-layout folder `root` holding the real DRIVE's (at `drive_root`) images `numbers` of `split`: links
    to their files in `folders`."""
    for folder in folders:
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        for number in numbers:
            drive_file(root, split, folder, number).symlink_to(drive_file(drive_root, split, folder, number))
    return root


def make_stare(root: Path, samples: list[Sample], names=None, unlabelled: int = 1) -> Path:
    """STARE as distributed: stare-images.tar, labels-ah.tar (the samples' labels) and labels-vk.tar (their
    second_label, where they have one) of gzipped P6 PPMs named imNNNN[.ah|.vk].ppm.gz; `unlabelled` more
    photographs without labels, as in the full image tar."""
    names = names or STARE_LABELLED[: len(samples)]
    images = {f"{n}.ppm.gz": gzip.compress(encode(s.image, ".ppm")) for n, s in zip(names, samples)}
    for k in range(unlabelled):
        images[f"im{400 + k:04d}.ppm.gz"] = gzip.compress(encode(samples[0].image, ".ppm"))
    ah = {f"{n}.ah.ppm.gz": gzip.compress(encode(mask_file(s.label, rgb=True), ".ppm")) for n, s in zip(names, samples)}
    vk = {
        f"{n}.vk.ppm.gz": gzip.compress(encode(mask_file(s.second_label, rgb=True), ".ppm"))
        for n, s in zip(names, samples)
        if s.second_label is not None
    }
    write_archive(root / "stare-images.tar", images)
    write_archive(root / "labels-ah.tar", ah)
    if vk:
        write_archive(root / "labels-vk.tar", vk)
    return root


def chase_names(count: int) -> list[str]:
    """CHASE_DB1's photographs in order: Image_01L, Image_01R, Image_02L, ..."""
    return [f"Image_{k // 2 + 1:02d}{'LR'[k % 2]}" for k in range(count)]


def make_chase(path: Path, samples: list[Sample], names=None) -> Path:
    """CHASE_DB1 as distributed: one flat zip of Image_NN[LR].jpg, _1stHO.png and _2ndHO.png (the samples'
    second_label, else their label)."""
    members = {}
    for name, s in zip(names or chase_names(len(samples)), samples):
        members[f"{name}.jpg"] = encode(s.image, ".jpg", quality=95)
        members[f"{name}_1stHO.png"] = encode(mask_file(s.label), ".png")
        second = s.second_label if s.second_label is not None else s.label
        members[f"{name}_2ndHO.png"] = encode(mask_file(second), ".png")
    return write_archive(path, members)


def hrf_names(count: int) -> list[str]:
    """HRF's photographs: 01_dr, 01_g, 01_h, 02_dr, ..."""
    return [f"{k // 3 + 1:02d}_{('dr', 'g', 'h')[k % 3]}" for k in range(count)]


def make_hrf(path: Path, samples: list[Sample], names=None) -> Path:
    """HRF as in all.zip: images/NN_dr.JPG and NN_g.jpg / NN_h.jpg, manual1/NN_x.tif, mask/NN_x_mask.tif (RGB)."""
    members = {}
    for name, s in zip(names or hrf_names(len(samples)), samples):
        members[f"images/{name}.{'JPG' if name.endswith('dr') else 'jpg'}"] = encode(s.image, ".jpg", quality=95)
        members[f"manual1/{name}.tif"] = encode(mask_file(s.label), ".tif")
        members[f"mask/{name}_mask.tif"] = encode(mask_file(s.fov, rgb=True), ".tif")
    return write_archive(path, members)


def make_folder(root: Path, samples: list[Sample], split: str = "train", masks: bool = True) -> Path:
    """The `folder` layout: <split>/images/<id>.png, <split>/labels/<id>_label.png, <split>/masks/<id>_mask.png."""
    for s in samples:
        for folder, name, data in (
            ("images", f"{s.id}.png", encode(s.image, ".png")),
            ("labels", f"{s.id}_label.png", encode(mask_file(s.label), ".png")),
            *([("masks", f"{s.id}_mask.png", encode(mask_file(s.fov), ".png"))] if masks else []),
        ):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            (root / split / folder / name).write_bytes(data)
    return root
