"""What every dataset reader shares: reading files from a folder or an archive as distributed (zip, tar, and
gzip-compressed members) without extracting anything to disk, and turning a photograph's files into a Sample.

A reader (drive.py, stare.py, ...) only knows its dataset's names and split: it lists the files (`Files`), pairs
each photograph with its label, FOV mask and second observer (`Entry`), and returns a `Catalogue`, which reads
the Samples of the images asked for.
"""

import gzip
import io
import logging
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from retinaseg.core.errors import DataError
from retinaseg.data.preprocess import (
    MAX_FILE_BYTES,
    check_file_size,
    estimate_fov,
    read_fov,
    read_image_file,
    read_mask,
    read_photograph,
)
from retinaseg.data.sample import Sample

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
SPLITS = ("train", "test", "all")


class Files:
    """The files under a folder, or inside a zip or tar archive, read in memory.

    `names`: every file's path relative to the root, '/'-separated and sorted (hidden files and macOS
    resource forks left out). `read(name)`: its bytes; a gzip-compressed file (`*.gz`, as the members of
    STARE's tars) comes back decompressed. `where(name)`: the path to show the user.
    """

    def __init__(self, path: Path):
        self.path = path
        self._zip = self._tar = None
        if path.is_dir():
            names = _walk(path)
        elif zipfile.is_zipfile(path):
            try:
                self._zip = zipfile.ZipFile(path)
            except (
                zipfile.BadZipFile,
                OSError,
                EOFError,
                ValueError,
                NotImplementedError,
                UnicodeDecodeError,
            ) as error:
                raise DataError(f"{path} is a damaged zip archive ({error}); replace it with a good copy") from None
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        elif path.is_file() and tarfile.is_tarfile(path):
            try:
                self._tar = tarfile.open(path)
                # Members of a tar made with `tar cf x.tar .` are named ./name.
                self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                raise DataError(f"{path} is a damaged tar archive ({error}); replace it with a good copy") from None
            names = list(self._members)
        else:
            raise DataError(f"{path} is a file but not a zip or tar archive (or a damaged one)")
        self.names = sorted(n for n in names if not any(part.startswith((".", "__MACOSX")) for part in n.split("/")))

    def holds_folder(self, folder: str) -> bool:
        """Whether `folder` (relative to the root) is there, even empty (an archive's entry for it counts)."""
        if self._zip is not None:
            return any(n.startswith(folder + "/") for n in self._zip.namelist())
        if self._tar is not None:
            return any(m.name.removeprefix("./").rstrip("/") == folder for m in self._tar.getmembers()) or any(
                n.startswith(folder + "/") for n in self.names
            )
        return (self.path / folder).is_dir()

    def where(self, name: str) -> str:
        return str(self.path / name) if self._zip is None and self._tar is None else f"{self.path}:{name}"

    def read(self, name: str) -> bytes:
        """The file's bytes; one that is (or inflates to) more than an image can hold is refused before it is read."""
        where = self.where(name)
        try:
            if self._zip is not None:
                # A zip's declared size bounds what it inflates to (zipfile stops there and checks the CRC).
                check_file_size(self._zip.getinfo(name).file_size, where)
                data = self._zip.read(name)
            elif self._tar is not None:
                check_file_size(self._members[name].size, where)
                data = self._tar.extractfile(self._members[name]).read()
            else:
                data = read_image_file(self.path / name)
            if name.endswith(".gz"):
                # gzip declares no trustworthy size: inflate one byte past the bound at most.
                with gzip.GzipFile(fileobj=io.BytesIO(data)) as file:
                    data = file.read(MAX_FILE_BYTES + 1)
                check_file_size(len(data), where)
            return data
        except (
            zipfile.BadZipFile,
            tarfile.TarError,
            gzip.BadGzipFile,
            EOFError,
            zlib.error,
            OSError,
            RuntimeError,  # zipfile: an encrypted member
            NotImplementedError,  # zipfile: a compression it lacks (Deflate64, ...)
        ) as error:
            raise DataError(f"{where} is damaged ({error}): replace the dataset with a good copy.") from None

    def matching(self, pattern: re.Pattern) -> dict[str, "Ref"]:
        """{first group of `pattern`: file} of the files whose path (relative to the root) `pattern` searches out."""
        found = {}
        for name in self.names:
            match = pattern.search(name)
            if match:
                found.setdefault(match.group(1), Ref(self, name))
        return found

    def summary(self, limit: int = 8) -> str:
        """What is there, for an error message: the first few top-level entries."""
        top = list(dict.fromkeys(name.split("/")[0] + ("/" if "/" in name else "") for name in self.names))
        shown = ", ".join(top[:limit]) + (f" and {len(top) - limit} more" if len(top) > limit else "")
        return f"found {shown}" if top else "found nothing"


def _walk(root: Path) -> list[str]:
    """The paths of the files under `root`, relative to it. Symlinked folders are followed (a dataset assembled
    from links), which Path.rglob does not do; a link to a folder it is already inside (itself, a folder above it,
    or one of two folders linking to each other) is skipped with a warning, as following it would walk forever."""
    names = []
    inside = {str(root): {os.path.realpath(root)}}  # each folder to walk: the real folders it is inside
    for folder, subfolders, files in os.walk(root, followlinks=True):
        above = inside.pop(folder)
        for subfolder in list(subfolders):
            path = os.path.join(folder, subfolder)
            target = os.path.realpath(path)
            if target in above:
                log.warning("skipping %s: it links back to %s, a folder it is inside", path, target)
                subfolders.remove(subfolder)
            else:
                inside[path] = above | {target}
        names += [(Path(folder) / file).relative_to(root).as_posix() for file in files]
    return names


@dataclass(frozen=True)
class Ref:
    """One file of a dataset: its name inside `files`."""

    files: Files
    name: str

    def read(self) -> bytes:
        return self.files.read(self.name)

    @property
    def where(self) -> str:
        return self.files.where(self.name)

    @property
    def basename(self) -> str:
        return PurePosixPath(self.name).name


@dataclass(frozen=True)
class Entry:
    """One labelled photograph: its id, official split ("train" or "test") and files. fov None: estimated."""

    id: str
    split: str
    image: Ref
    label: Ref
    fov: Ref | None = None
    second: Ref | None = None


class Catalogue:
    """A dataset's labelled photographs, listed and paired but not yet read.

    `missing`: what to tell the user when a split that has no images is asked for (e.g. DRIVE without test/).
    """

    def __init__(self, name: str, entries: list[Entry], missing: dict[str, str] | None = None):
        ids = [e.id for e in entries]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise DataError(f"{name}: several photographs have the id {', '.join(repeated)}; rename them apart.")
        for split in ("train", "test"):
            # A second observer that misses some images of a split could score none of them.
            with_second = [e for e in entries if e.split == split and e.second is not None]
            without = [e.image.where for e in entries if e.split == split and e.second is None]
            if with_second and without:
                raise DataError(
                    f"{name}: image(s) {', '.join(without)} have no second observer's label while the other {split} "
                    f"images have one (e.g. {with_second[0].second.where}). Add the missing labels or remove the "
                    "second observer's files."
                )
        self.name, self.entries, self.missing = name, {e.id: e for e in entries}, missing or {}

    def ids(self, split: str = "all") -> list[str]:
        """The ids of the official `split` ("train", "test") or of every labelled image ("all"), in order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        ids = [i for i, e in self.entries.items() if split in ("all", e.split)]
        if not ids:
            raise DataError(self.missing.get(split) or f"{self.name} has no labelled {split} images.")
        return ids

    def read(self, ids: Iterable[str]) -> Iterator[Sample]:
        """The Samples of `ids`, read one at a time, in that order."""
        for i in ids:
            yield read_sample(self.entries[i])


def read_sample(entry: Entry) -> Sample:
    """Read and check one photograph's files: sizes must match, labels be binary, a given FOV not be empty."""
    image = read_photograph(entry.image.read(), entry.image.where)
    name, shape = entry.image.basename, image.shape[:2]
    label = read_mask(entry.label.read(), entry.label.where, name, shape)
    fov = estimate_fov(image) if entry.fov is None else read_fov(entry.fov.read(), entry.fov.where, name, shape)
    second = None if entry.second is None else read_mask(entry.second.read(), entry.second.where, name, shape)
    return Sample(entry.id, image, label, fov, fov_given=entry.fov is not None, second_label=second)


def open_root(root, name: str, how_to_get: str) -> Path:
    """`root` as an existing path, or a DataError that says how to get the dataset."""
    if root is None or str(root) == "":
        raise DataError(f"data.root is not set for {name}. {how_to_get}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"no {name} dataset at data.root={path} (resolved: {path.resolve()}). {how_to_get}")
    return path


def open_files(root, name: str, how_to_get: str) -> Files:
    """`Files` of data.root, a folder or an archive (`.path` is root), or a DataError that says how to get the dataset."""
    path = open_root(root, name, how_to_get)
    try:
        return Files(path)
    except DataError as error:
        raise DataError(f"data.root={error}. {how_to_get}") from None


def open_part(root: Path, part: str) -> Files | None:
    """A part of a dataset distributed as several folders or archives: `<root>/<part>/`, or the archive
    `<root>/<part>.tar` (.tar.gz, .tgz, .zip) as downloaded; None when neither is there."""
    if (root / part).is_dir():
        return Files(root / part)
    for suffix in ARCHIVE_SUFFIXES:
        if (root / f"{part}{suffix}").is_file():
            return Files(root / f"{part}{suffix}")
    return None


def without_image(what: str, refs: Iterable[Ref]) -> DataError:
    names = ", ".join(ref.where for ref in refs)
    return DataError(f"{what} without an image: {names}. Add the images or remove these files.")


def without_file(image: Ref, what: str, expected: str) -> DataError:
    return DataError(f"image {image.where} has no {what} file (expected {expected}). Add it or remove the image.")


def check_paired_with_images(
    what: str, found: dict, images: dict, expected: Callable[[Hashable], str] | None = None
) -> None:
    """Refuses files of `found` (key: Ref) whose key no image of `images` has, naming them as `what` files; with
    `expected`, also the first image (in key order) that has no file in `found`, `expected(key)` saying where
    that file belongs."""
    unpaired = sorted(set(found) - set(images))
    if unpaired:
        raise without_image(f"{what} files", (found[key] for key in unpaired))
    if expected is not None:
        for key, image in sorted(images.items()):
            if key not in found:
                raise without_file(image, what, expected(key))
