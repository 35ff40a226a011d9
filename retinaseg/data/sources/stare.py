"""STARE (Hoover et al., IEEE TMI 2000) as distributed: three tars, or the folders they unpack to.

    <root>/stare-images.tar   (or stare-images/)   imNNNN.ppm.gz  photographs, 700x605 P6 PPM
    <root>/labels-ah.tar      (or labels-ah/)      imNNNN.ah.ppm.gz  Adam Hoover's labels: the reference
    <root>/labels-vk.tar      (or labels-vk/)      imNNNN.vk.ppm.gz  Valentina Kouznetsova's: the second observer

Members are read gzipped or not (`.ppm` or `.ppm.gz`), at the archive's top or in a folder. Only 20 photographs
are labelled (the full image tar holds about 400; the others are not read). STARE has no FOV masks: the FOV is
estimated from each photograph.

Official split: the first 10 labelled images by name train, the other 10 test, as mmsegmentation's
tools/dataset_converters/stare.py (sorted names, 10/10) and bob.ip.binseg's protocol stare/default.json
(split of Maninis et al. 2016). Leave-one-out (orobix retina-unet) is `data.folds=20`.
"""

import logging
import re

from retinaseg.core.errors import DataError
from retinaseg.data.sources.files import (
    Catalogue,
    Entry,
    check_paired_with_images,
    open_part,
    open_root,
    without_file,
)

log = logging.getLogger(__name__)

NAME = "STARE"
ROOT_ENV = "STARE_ROOT"
HOW_TO_GET = (
    "STARE is distributed by Adam Hoover (Clemson University): download stare-images.tar, labels-ah.tar and "
    "labels-vk.tar into one folder and pass data.root=<folder> or set STARE_ROOT."
)
# The 20 labelled photographs, in order; the first 10 train.
LABELLED = (
    *("im0001", "im0002", "im0003", "im0004", "im0005", "im0044", "im0077", "im0081", "im0082", "im0139"),
    *("im0162", "im0163", "im0235", "im0236", "im0239", "im0240", "im0255", "im0291", "im0319", "im0324"),
)
TRAIN = LABELLED[:10]
IMAGE = re.compile(r"(?:^|/)(im\d{4})\.ppm(?:\.gz)?$", re.IGNORECASE)
LABELS = {
    part: re.compile(rf"(?:^|/)(im\d{{4}})\.{part[-2:]}\.ppm(?:\.gz)?$", re.IGNORECASE)
    for part in ("labels-ah", "labels-vk")
}
LAYOUT = (
    "stare-images.tar (or a folder stare-images/) of imNNNN.ppm[.gz] and labels-ah.tar (or labels-ah/) of "
    "imNNNN.ah.ppm[.gz], optionally labels-vk.tar (or labels-vk/)"
)


def catalogue(root) -> Catalogue:
    path = open_root(root, NAME, HOW_TO_GET)
    if not path.is_dir():
        raise DataError(f"data.root={path} must be the folder holding {LAYOUT}. {HOW_TO_GET}")
    images_part, ah_part, vk_part = (open_part(path, part) for part in ("stare-images", "labels-ah", "labels-vk"))
    if images_part is None or ah_part is None:
        found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:8]) or "nothing"
        raise DataError(
            f"data.root={path} does not have the STARE layout: expected {LAYOUT}; found {found}. {HOW_TO_GET}"
        )
    images = images_part.matching(IMAGE)
    if not images:
        raise DataError(f"{images_part.path} holds no imNNNN.ppm[.gz] photographs; {images_part.summary()}.")
    labels = {
        part: files.matching(LABELS[part])
        for part, files in (("labels-ah", ah_part), ("labels-vk", vk_part))
        if files is not None
    }
    for part, found in labels.items():
        check_paired_with_images(part, found, images)
    for key in LABELLED:
        if key in images and key not in labels["labels-ah"]:
            raise without_file(images[key], "labels-ah", f"{key}.ah.ppm.gz in {ah_part.path}, one of STARE's 20 labels")
    if vk_part is None:
        log.info("no labels-vk in %s: STARE is read without its second observer", path)
    log.debug("%d of STARE's %d photographs are labelled", len(labels["labels-ah"]), len(images))
    entries = [
        Entry(
            key,
            "train" if key in TRAIN else "test",
            images[key],
            label,
            second=labels.get("labels-vk", {}).get(key),
        )
        for key, label in sorted(labels["labels-ah"].items())
    ]
    if not entries:
        raise DataError(f"{ah_part.path} holds no imNNNN.ah.ppm[.gz] labels; {ah_part.summary()}.")
    return Catalogue(NAME, entries)
