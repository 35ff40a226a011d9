"""Writing files so that a crash or a full disk never leaves a partial file under a real name.

Every file of a run that matters (checkpoints, CSV, JSON, npz, PNG) is written through `write_atomically`:
to a temporary name beside it, flushed and synced, then renamed over it in one step.
"""

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from PIL import Image

from retinaseg.core.errors import ConfigError, DiskFullError

FULL = (errno.ENOSPC, errno.EDQUOT)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` by calling `write(file)` on a temporary file beside it, renamed over `path` once complete.

    A crash or a failed write midway leaves the previous version of `path` (if any) untouched and removes
    the temporary file. A full disk becomes a DiskFullError, another write error a ConfigError, each naming
    the file.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        # On a read-only filesystem removing it fails too (EROFS): the error to report is the write's.
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError.
        cause = error if isinstance(error, OSError) else error.__context__
        if not isinstance(cause, OSError):
            raise
        if cause.errno in FULL:
            raise DiskFullError(
                f"cannot write {path}: the disk is full. Files written before it are intact; free space and run again "
                "(a training run: resume it)."
            ) from None
        raise ConfigError(f"cannot write {path}: {cause.strerror or cause}. Fix the path or its permissions.") from None
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda file: file.write(text.encode()))


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """A uint8 (H, W) or (H, W, 3) array as a PNG file."""
    return write_atomically(path, lambda file: Image.fromarray(image).save(file, format="PNG"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through `write_atomically`, so `last.ckpt` is always a whole checkpoint.

    Lightning's own stages the file in the system's temporary folder and moves it, which is a plain
    (non-atomic) copy when that folder is on another filesystem.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        write_atomically(path, lambda file: torch.save(checkpoint, file))
