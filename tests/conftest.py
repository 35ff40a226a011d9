"""Shared fixtures: the real DRIVE dataset (from $DRIVE_ROOT) and a small trained checkpoint."""

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def drive_root() -> Path:
    """DRIVE's folder; skipped when DRIVE_ROOT is unset, a failure when RETINASEG_REQUIRE_DRIVE=1 (CI)."""
    root = os.environ.get("DRIVE_ROOT")
    if root and (Path(root) / "training" / "images").is_dir():
        return Path(root)
    message = f"DRIVE not found (DRIVE_ROOT={root!r})"
    if os.environ.get("RETINASEG_REQUIRE_DRIVE") == "1":
        pytest.fail(message + " but RETINASEG_REQUIRE_DRIVE=1")
    pytest.skip(message)


@pytest.fixture(scope="session")
def drive_checkpoint(drive_root, tmp_path_factory) -> Path:
    """best.ckpt of a tiny real training on DRIVE (small U-Net, a few hundred patches, no test stage)."""
    from helpers import TINY, compose_config
    from retinaseg.train import train

    run_dir = tmp_path_factory.mktemp("drive_run")
    train(
        compose_config("train", TINY + [f"data.root={drive_root}", "data.patches_per_epoch=256", "test=false"], run_dir)
    )
    return run_dir / "checkpoints" / "best.ckpt"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, to fill up (mounting needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
