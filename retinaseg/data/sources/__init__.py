"""One small reader per dataset (`data=<name>`), each listing its files and knowing its official split.

Every reader's `catalogue(root)` returns a Catalogue (retinaseg.data.sources.files) whose `ids(split)` lists
the labelled images of "train", "test" or "all", and whose `read(ids)` yields their Samples.
"""

from retinaseg.data.sources import chase_db1, drive, folder, hrf, stare
from retinaseg.data.sources.files import Catalogue
from retinaseg.data.sources.synthetic import SyntheticCatalogue

READERS = {"drive": drive, "stare": stare, "chase_db1": chase_db1, "hrf": hrf, "folder": folder}
DATASETS = (*READERS, "synthetic")


def open_dataset(dataset: str, root) -> Catalogue:
    """The catalogue of a dataset read from a file tree (not `synthetic`, which draws its images); `dataset` was
    checked by the data module, where data.dataset is read."""
    return READERS[dataset].catalogue(root)


def root_env(dataset: str) -> str | None:
    """The environment variable that holds the dataset's default data.root (DRIVE_ROOT, ...), if any."""
    return getattr(READERS.get(dataset), "ROOT_ENV", None)


__all__ = ["DATASETS", "READERS", "Catalogue", "SyntheticCatalogue", "open_dataset", "root_env"]
