"""DRIVE (Staal et al., IEEE TMI 2004) in its original layout, from a folder or its zip (or a tar):

    <root>/training/{images,1st_manual,mask}/   21_training.tif, 21_manual1.gif, 21_training_mask.gif
    <root>/test/{images,1st_manual,2nd_manual,mask}/   01_test.tif, 01_manual1.gif, 01_manual2.gif, ...

The archive may hold training/ and test/ at its top or inside a folder such as DRIVE/. Files pair by their
leading number within a split. Official split: training/ (20 images) and test/ (20), as distributed; the test
images' 2nd_manual is the second observer. FOV masks are given.
"""

import re

from retinaseg.core.errors import DataError
from retinaseg.data.preprocess import IMAGE_SUFFIXES
from retinaseg.data.sources.files import (
    Catalogue,
    Entry,
    Files,
    Ref,
    check_paired_with_images,
    open_files,
)

NAME = "DRIVE"
ROOT_ENV = "DRIVE_ROOT"
HOW_TO_GET = (
    "DRIVE is distributed for research use by its authors (Staal et al., IEEE TMI 2004); download it "
    "(the folder or its zip with training/ and test/ inside) and pass data.root=<path> or set DRIVE_ROOT. "
    "To try the project without it, run `python -m retinaseg.train experiment=demo` (synthetic images, seconds)."
)
FOLDERS = {"train": "training", "test": "test"}
# A file of training/images/ or test/images/; group 1 is the folder they are in ("" or e.g. "DRIVE/").
LAYOUT = re.compile(r"^((?:.*/)?)(?:training|test)/images/[^/]+$")


def _by_number(files: Files, folder: str) -> dict[int, Ref]:
    """The image files directly inside `folder`, by their leading number."""
    numbered = {}
    for name in files.names:
        if name.startswith(folder + "/") and "/" not in name[len(folder) + 1 :]:
            match = re.match(r"(\d+)_", name[len(folder) + 1 :])
            if match and name.lower().endswith(IMAGE_SUFFIXES):
                numbered.setdefault(int(match.group(1)), Ref(files, name))
    return numbered


def catalogue(root) -> Catalogue:
    files = open_files(root, NAME, HOW_TO_GET)
    first = next((match for match in map(LAYOUT.match, files.names) if match), None)
    if first is None:
        raise DataError(
            f"data.root={files.path} does not have the DRIVE layout: expected training/images/ and test/images/ with "
            f"1st_manual/ and mask/ beside them; {files.summary()}. {HOW_TO_GET}"
        )
    prefix = first.group(1)
    entries, missing = [], {}
    for split, folder in FOLDERS.items():
        base = prefix + folder
        images = _by_number(files, f"{base}/images")
        if not images:
            missing[split] = (
                f"{files.where(base + '/images')} is missing or holds no images: data.root={files.path} does not have "
                f"the DRIVE layout. {HOW_TO_GET}"
            )
            continue
        parts = {part: _by_number(files, f"{base}/{part}") for part in ("1st_manual", "mask", "2nd_manual")}
        for part in ("1st_manual", "mask"):
            folder = files.where(f"{base}/{part}")
            check_paired_with_images(
                part, parts[part], images, lambda number, folder=folder: f"one named {number:02d}_... in {folder}"
            )
        check_paired_with_images("2nd_manual", parts["2nd_manual"], images)
        for number, image in sorted(images.items()):
            stem = image.basename.rsplit(".", 1)[0]
            entries.append(
                Entry(
                    stem,
                    split,
                    image,
                    parts["1st_manual"][number],
                    fov=parts["mask"][number],
                    second=parts["2nd_manual"].get(number),
                )
            )
    return Catalogue(NAME, entries, missing)
