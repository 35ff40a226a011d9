"""Your own photographs (`data=folder`), from a folder or a zip/tar of it:

    <root>/train/images/   photographs (PNG, JPEG, TIFF, PPM, GIF, BMP; 8/16-bit, RGB, RGBA or grayscale)
    <root>/train/labels/   vessel labels (two values, e.g. 0/255)
    <root>/train/masks/    FOV masks (optional: without this folder the FOV is estimated from each photograph)
    <root>/test/...        the same, optional: the test split

A label or mask pairs with the image whose name (without extension) it starts with: `a.jpg` with `a.png`,
`a_label.png` or `a_mask.tif`. Images without a label are named in a warning and left out.
"""

import logging
import re
from pathlib import PurePosixPath

from retinaseg.core.errors import DataError
from retinaseg.data.preprocess import IMAGE_SUFFIXES
from retinaseg.data.sources.files import (
    Catalogue,
    Entry,
    Files,
    Ref,
    open_files,
    without_file,
    without_image,
)

log = logging.getLogger(__name__)

NAME = "folder"
ROOT_ENV = None
HOW_TO_GET = (
    "data=folder reads your own photographs: pass data.root=<folder> holding train/images/ and train/labels/ "
    "(optionally train/masks/, and test/ laid out the same)."
)
# A file of train/images/; group 1 is the folder they are in ("" or e.g. "mydata/").
LAYOUT = re.compile(r"^((?:.*/)?)train/images/[^/]+$")


def _stem(ref: Ref) -> str:
    """The name without its extension (only the last: `tr.v1.png` and `tr.v2.png` are two photographs)."""
    return PurePosixPath(ref.name).stem


def _in_folder(files: Files, folder: str) -> list[Ref]:
    """The files directly inside `folder`; others than images are skipped with a warning."""
    refs = [Ref(files, n) for n in files.names if n.startswith(folder + "/") and "/" not in n[len(folder) + 1 :]]
    others = [ref.basename for ref in refs if not ref.name.lower().endswith(IMAGE_SUFFIXES)]
    if others:
        log.warning(
            "skipping %d file(s) in %s that are not images: %s", len(others), files.where(folder), ", ".join(others)
        )
    return [ref for ref in refs if ref.name.lower().endswith(IMAGE_SUFFIXES)]


def _pair(images: dict[str, Ref], refs: list[Ref], what: str) -> dict[str, Ref]:
    """{image stem: the file of `refs` whose name starts with it} (the longest such stem)."""
    stems = sorted(images, key=len, reverse=True)
    paired, unpaired = {}, []
    for ref in refs:
        stem = next((s for s in stems if _stem(ref).startswith(s)), None)
        if stem is None:
            unpaired.append(ref)
        elif stem in paired:
            raise DataError(
                f"image {images[stem].where} has two {what}s, {paired[stem].basename} and {ref.basename}: keep one."
            )
        else:
            paired[stem] = ref
    if unpaired:
        raise without_image(f"{what}s", unpaired)
    return paired


def catalogue(root) -> Catalogue:
    files = open_files(root, NAME, HOW_TO_GET)
    first = next((match for match in map(LAYOUT.match, files.names) if match), None)
    if first is None:
        raise DataError(f"data.root={files.path} does not have the folder layout: {files.summary()}. {HOW_TO_GET}")
    entries, missing = [], {}
    for split in ("train", "test"):
        base = first.group(1) + split
        refs = _in_folder(files, f"{base}/images")
        stems = [_stem(ref) for ref in refs]
        repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
        if repeated:
            raise DataError(
                f"{files.where(base + '/images')} holds several photographs named {', '.join(repeated)} "
                "(different extensions): rename them apart."
            )
        images = dict(zip(stems, refs))
        if not images:
            missing[split] = (
                f"{files.where(base + '/images')} is missing: data=folder tests on <root>/test/images and "
                "<root>/test/labels. Add them, use cross-validation (data.folds=5), or train with test=false."
            )
            continue
        labels = _pair(images, _in_folder(files, f"{base}/labels"), "label")
        mask_refs = _in_folder(files, f"{base}/masks")
        if not mask_refs and files.holds_folder(f"{base}/masks"):
            raise DataError(
                f"{files.where(base + '/masks')} holds no images: add the FOV masks, or remove the folder to have "
                "every FOV estimated from its photograph."
            )
        masks = _pair(images, mask_refs, "mask") if mask_refs else {}
        unlabelled = [ref.basename for stem, ref in sorted(images.items()) if stem not in labels]
        if unlabelled:
            log.warning(
                "%d image(s) in %s have no label and are left out: %s",
                len(unlabelled),
                files.where(base + "/images"),
                ", ".join(unlabelled),
            )
        for stem, label in sorted(labels.items()):
            if mask_refs and stem not in masks:
                raise without_file(images[stem], "mask", f"one named {stem}... in {files.where(base + '/masks')}")
            entries.append(Entry(stem, split, images[stem], label, fov=masks.get(stem)))
        if not labels:
            missing[split] = f"none of the images in {files.where(base + '/images')} has a label in {base}/labels/."
    return Catalogue(NAME, entries, missing)
