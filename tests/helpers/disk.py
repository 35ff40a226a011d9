"""A full disk, for the tests of what a write does when space runs out."""

import os
from pathlib import Path


def fill_disk(folder: Path, left: int) -> None:
    """Fill the filesystem of `folder` (a small tmpfs) with one file until `left` bytes are free."""
    stat = os.statvfs(folder)
    (folder / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - left))
