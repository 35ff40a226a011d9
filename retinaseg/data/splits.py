"""Which images train, validate and test: the dataset's official split or k-fold cross-validation, with the
validation images always held out of the training images, by image.

All choices are fixed by `split_seed` and depend only on the list of ids, never on the images.
"""

import numpy as np

from retinaseg.core.errors import ConfigError, check_choice, check_int

PARTS = ("train", "val", "test", "all")


def validation(ids: list[str], val_images: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): `val_images` of `ids` held out at random (by `seed`), both in the order of `ids`."""
    if val_images >= len(ids):
        raise ConfigError(
            f"data.val_images={val_images} leaves no training image: there are {len(ids)} training images."
        )
    held_out = set(np.random.default_rng(seed).permutation(len(ids))[:val_images].tolist())
    return [i for k, i in enumerate(ids) if k not in held_out], [i for k, i in enumerate(ids) if k in held_out]


def kfold(ids: list[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, test) of fold `fold` of `folds`: the ids shuffled by `seed` and cut into `folds` parts of nearly
    equal size; part `fold` tests, the others train. Every id is tested in exactly one fold."""
    check_int("data.folds", folds, 2)
    if folds > len(ids):
        raise ConfigError(f"data.folds={folds} is more than the {len(ids)} labelled images of the dataset")
    check_int("data.fold", fold, 0, folds - 1)
    parts = np.array_split(np.random.default_rng(seed).permutation(len(ids)), folds)
    tested = set(parts[fold].tolist())
    return [i for k, i in enumerate(ids) if k not in tested], [i for k, i in enumerate(ids) if k in tested]


def split_ids(catalogue, part: str, folds: int | None, fold: int, val_images: int, seed: int) -> list[str]:
    """The ids of `part` ("train", "val", "test" or "all") of a dataset's catalogue.

    Without `folds`: the official split, validation images held out of its training images. With `folds`:
    every labelled image pooled, fold `fold` tested, validation held out of the other folds.
    """
    check_choice("split", part, PARTS)
    if part == "all":
        return catalogue.ids("all")
    if folds is not None:
        train, test = kfold(catalogue.ids("all"), folds, fold, seed)
    else:
        train, test = (None, catalogue.ids("test")) if part == "test" else (catalogue.ids("train"), None)
    if part == "test":
        return test
    train, val = validation(train, val_images, seed)
    return train if part == "train" else val
