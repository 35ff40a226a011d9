"""CHASE_DB1 (Fraz et al., IEEE TBME 2012) as distributed: one flat folder, or its zip (CHASEDB1.zip).

    Image_NN{L,R}.jpg         28 photographs (NN 01-14, left and right eye of 14 children), 999x960
    Image_NN{L,R}_1stHO.png   the first observer's labels: the reference
    Image_NN{L,R}_2ndHO.png   the second observer's

Files are found by name wherever they are in the folder or zip. CHASE_DB1 has no FOV masks: the FOV is estimated
from each photograph.

Official split: children 01-10 (the first 20 photographs) train, 11-14 (the last 8) test, as FR-UNet
(data_process.py) and mmsegmentation (tools/dataset_converters/chase_db1.py). (bob.ip.binseg and Little W-Net
use the first 8 to train and the other 20 to test; `data.folds` gives cross-validation.)
"""

import re

from retinaseg.core.errors import DataError
from retinaseg.data.sources.files import (
    Catalogue,
    Entry,
    check_paired_with_images,
    open_files,
)

NAME = "CHASE_DB1"
ROOT_ENV = "CHASE_DB1_ROOT"
HOW_TO_GET = (
    "CHASE_DB1 is distributed by Kingston University (CHASEDB1.zip): pass data.root=<the zip or the folder it "
    "unpacks to> or set CHASE_DB1_ROOT."
)
TRAIN_CHILDREN = 10
IMAGE = re.compile(r"(?:^|/)(Image_\d{2}[LR])\.jpe?g$", re.IGNORECASE)
FIRST = re.compile(r"(?:^|/)(Image_\d{2}[LR])_1stHO\.png$", re.IGNORECASE)
SECOND = re.compile(r"(?:^|/)(Image_\d{2}[LR])_2ndHO\.png$", re.IGNORECASE)


def catalogue(root) -> Catalogue:
    files = open_files(root, NAME, HOW_TO_GET)
    images, first, second = (files.matching(pattern) for pattern in (IMAGE, FIRST, SECOND))
    if not images:
        raise DataError(
            f"data.root={files.path} does not have the CHASE_DB1 layout: expected Image_NN[LR].jpg photographs with "
            f"Image_NN[LR]_1stHO.png labels (and _2ndHO.png) in one folder or zip; {files.summary()}. {HOW_TO_GET}"
        )
    check_paired_with_images("1stHO label", first, images, expected=lambda key: f"{key}_1stHO.png beside it")
    check_paired_with_images("2ndHO label", second, images)
    entries = []
    for key, image in sorted(images.items()):
        split = "train" if int(key[6:8]) <= TRAIN_CHILDREN else "test"
        entries.append(Entry(key, split, image, first[key], second=second.get(key)))
    return Catalogue(NAME, entries)
