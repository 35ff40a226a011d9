"""Reading DRIVE in its original layout, from a folder or from the zip it is distributed as.

    <root>/training/{images,1st_manual,mask}/   21_training.tif, 21_manual1.gif, 21_training_mask.gif
    <root>/test/{images,1st_manual,2nd_manual,mask}/   01_test.tif, 01_manual1.gif, 01_manual2.gif, ...

Files pair by their leading number. Labels are read through luminance, so palette GIFs whose raw
values are 0/1 (the second observer) read the same as 0/255 ones.
"""

import io
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from retinaseg.data.sample import Sample
from retinaseg.errors import DataError

SPLITS = ("training", "test")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".ppm", ".gif", ".bmp")
HOW_TO_GET = (
    "DRIVE is distributed for research use by its authors (Staal et al., IEEE TMI 2004); download it "
    "(the folder or its zip with training/ and test/ inside) and pass data.root=<path> or set DRIVE_ROOT. "
    "To try the project without it, run with data=synthetic."
)


class _Files:
    """Uniform read access to a DRIVE folder or zip: list the files of a subfolder, read one as bytes."""

    def __init__(self, root: Path):
        self.root = root
        self.zip = None
        self.prefix = ""
        if root.is_file():
            try:
                self.zip = zipfile.ZipFile(root)
            except zipfile.BadZipFile:
                raise DataError(f"data.root={root} is a file but not a zip archive. {HOW_TO_GET}") from None
            # The archive may hold training/ at its top or inside a folder such as DRIVE/.
            names = [n for n in self.zip.namelist() if re.search(r"(^|/)training/images/[^/]+$", n)]
            if not names:
                raise DataError(f"{root} has no training/images/ inside: not a DRIVE zip. {HOW_TO_GET}")
            self.prefix = names[0][: names[0].index("training/images/")]

    def list(self, folder: str) -> list[str]:
        if self.zip is not None:
            start = self.prefix + folder + "/"
            return sorted(
                n[len(start) :]
                for n in self.zip.namelist()
                if n.startswith(start) and "/" not in n[len(start) :] and n != start
            )
        path = self.root / folder
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []

    def has(self, folder: str) -> bool:
        if self.zip is not None:
            return any(n.startswith(self.prefix + folder + "/") for n in self.zip.namelist())
        return (self.root / folder).is_dir()

    def where(self, folder: str, name: str) -> str:
        return f"{self.root}:{self.prefix}{folder}/{name}" if self.zip is not None else str(self.root / folder / name)

    def open_image(self, folder: str, name: str) -> Image.Image:
        where = self.where(folder, name)
        try:
            if self.zip is not None:
                image = Image.open(io.BytesIO(self.zip.read(self.prefix + folder + "/" + name)))
            else:
                image = Image.open(self.root / folder / name)
            image.load()
            return image
        # A damaged zip member fails its CRC check (BadZipFile) or its decompression (zlib.error).
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, zipfile.BadZipFile, zlib.error) as error:
            raise DataError(f"cannot read image {where}: {error}. Replace the file with a good copy.") from None


def read_binary(image: Image.Image, where: str) -> np.ndarray:
    """A label or mask as uint8 {0, 1}, read through luminance.

    DRIVE's palette GIFs map index 0/1 to luminance 3/253, so bright (>= 128) is foreground; a mask
    stored with raw values 0/1 in a grayscale image is foreground where non-zero.
    """
    gray = np.asarray(image.convert("L"))
    values = np.unique(gray)
    if len(values) > 2:
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise DataError(
            f"{where} is not a binary mask: it holds {len(values)} values ({shown}). Labels and FOV masks must have two values."
        )
    return (gray >= 128 if values.max() > 1 else gray > 0).astype(np.uint8)


def _by_number(names: list[str]) -> dict[int, str]:
    numbered = {}
    for name in names:
        match = re.match(r"(\d+)_", name)
        if match and name.lower().endswith(IMAGE_SUFFIXES):
            numbered[int(match.group(1))] = name
    return numbered


def read_drive(root: str | Path, split: str) -> list[Sample]:
    """All images of one DRIVE split ("training" or "test"), with labels (1st_manual) and FOV masks.

    The test split's second observer, when present, is in `sample.extra["2nd_manual"]`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if root is None or str(root) == "":
        raise DataError(f"data.root is not set and DRIVE_ROOT is empty. {HOW_TO_GET}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"no DRIVE dataset at data.root={root} (resolved: {root.resolve()}). {HOW_TO_GET}")
    files = _Files(root)
    if not files.has(f"{split}/images"):
        raise DataError(
            f"{files.where(split, 'images')} is missing: data.root={root} does not have the DRIVE layout. {HOW_TO_GET}"
        )
    images = _by_number(files.list(f"{split}/images"))
    if not images:
        raise DataError(f"{files.where(split, 'images')} holds no images. {HOW_TO_GET}")
    labels = _by_number(files.list(f"{split}/1st_manual"))
    masks = _by_number(files.list(f"{split}/mask"))
    second = _by_number(files.list(f"{split}/2nd_manual"))
    for folder, found in (("1st_manual", labels), ("mask", masks)):
        unpaired = sorted(set(found) - set(images))
        if unpaired:
            names = ", ".join(files.where(f"{split}/{folder}", found[n]) for n in unpaired)
            raise DataError(f"{folder} files without an image: {names}. Add the images or remove these files.")

    samples = []
    for number, image_name in sorted(images.items()):
        for folder, found in (("1st_manual", labels), ("mask", masks)):
            if number not in found:
                raise DataError(
                    f"image {files.where(f'{split}/images', image_name)} has no {folder} file "
                    f"(expected one named {number:02d}_... in {files.where(split, folder)}). Add it or remove the image."
                )
        image = np.array(files.open_image(f"{split}/images", image_name).convert("RGB"))
        arrays = {}
        for folder, found in (("1st_manual", labels), ("mask", masks), ("2nd_manual", second)):
            if number in found:
                where = files.where(f"{split}/{folder}", found[number])
                arrays[folder] = read_binary(files.open_image(f"{split}/{folder}", found[number]), where)
                if arrays[folder].shape != image.shape[:2]:
                    raise DataError(
                        f"{where} is {arrays[folder].shape[1]}x{arrays[folder].shape[0]} but its image "
                        f"{image_name} is {image.shape[1]}x{image.shape[0]} (width x height); they must match."
                    )
        if not arrays["mask"].any():
            raise DataError(f"FOV mask {files.where(f'{split}/mask', masks[number])} is empty (all zero).")
        extra = {"2nd_manual": arrays["2nd_manual"]} if "2nd_manual" in arrays else None
        samples.append(Sample(Path(image_name).stem, image, arrays["1st_manual"], arrays["mask"].astype(bool), extra))
    return samples
