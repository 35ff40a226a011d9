"""HRF, the High-Resolution Fundus database (Budai et al., IJBI 2013), as distributed in all.zip (or unpacked):

    images/NN_{dr,g,h}.JPG|.jpg     45 photographs of 3504x2336 (15 diabetic retinopathy, glaucoma, healthy;
                                    the case of the extension varies)
    manual1/NN_{dr,g,h}.tif         the vessel labels
    mask/NN_{dr,g,h}_mask.tif       the FOV masks (RGB TIFFs; read through luminance)

The folders may sit at the zip's top or inside a folder. No second observer.

Official split: images 01-05 of each kind train (15), 06-15 test (30), as Little W-Net (get_public_data.py),
mmsegmentation (tools/dataset_converters/hrf.py) and bob.ip.binseg (hrf/default.json, split of Orlando et al.
2017). The default data.scale of conf/data/hrf.yaml (0.25) brings the photographs to 876x584.
"""

import re

from retinaseg.core.errors import DataError
from retinaseg.data.sources.files import (
    Catalogue,
    Entry,
    check_paired_with_images,
    open_files,
)

NAME = "HRF"
ROOT_ENV = "HRF_ROOT"
HOW_TO_GET = (
    "HRF is distributed by FAU Erlangen (all.zip, 'download the whole dataset'): pass data.root=<all.zip or the "
    "folder it unpacks to> or set HRF_ROOT."
)
TRAIN_NUMBERS = 5
IMAGE = re.compile(r"(?:^|/)images/(\d{2}_(?:dr|g|h))\.jpe?g$", re.IGNORECASE)
LABEL = re.compile(r"(?:^|/)manual1/(\d{2}_(?:dr|g|h))\.tiff?$", re.IGNORECASE)
MASK = re.compile(r"(?:^|/)mask/(\d{2}_(?:dr|g|h))_mask\.tiff?$", re.IGNORECASE)


def catalogue(root) -> Catalogue:
    files = open_files(root, NAME, HOW_TO_GET)
    images, labels, masks = (files.matching(pattern) for pattern in (IMAGE, LABEL, MASK))
    if not images:
        raise DataError(
            f"data.root={files.path} does not have the HRF layout: expected images/NN_dr.JPG (NN_g.jpg, NN_h.jpg), "
            f"manual1/NN_dr.tif and mask/NN_dr_mask.tif; {files.summary()}. {HOW_TO_GET}"
        )
    check_paired_with_images("manual1", labels, images, expected=lambda key: f"manual1/{key}.tif")
    check_paired_with_images("mask", masks, images, expected=lambda key: f"mask/{key}_mask.tif")
    entries = []
    for key, image in sorted(images.items()):
        split = "train" if int(key[:2]) <= TRAIN_NUMBERS else "test"
        entries.append(Entry(key, split, image, labels[key], fov=masks[key]))
    return Catalogue(NAME, entries)
