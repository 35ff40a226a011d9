"""Shared fixtures: the real DRIVE dataset (from $DRIVE_ROOT) and a small trained checkpoint."""

import os
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
