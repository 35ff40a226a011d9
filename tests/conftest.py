"""Shared fixtures: the real DRIVE dataset (from $DRIVE_ROOT), a small trained checkpoint and its evaluations."""

import contextlib
import io
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
    from helpers.configs import TINY, compose_config
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


@pytest.fixture(scope="session")
def drive_evaluation(drive_root, drive_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """`retinaseg.eval` of `drive_checkpoint` on DRIVE's 20 test images at threshold 0.5: its run directory and
    the table it printed."""
    from helpers.configs import compose_config
    from retinaseg.eval import evaluate

    directory = tmp_path_factory.mktemp("drive_eval")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        evaluate(compose_config("eval", [f"ckpt_path={drive_checkpoint}", f"data.root={drive_root}"], directory))
    return directory, printed.getvalue()


@pytest.fixture(scope="session")
def drive_evaluation_wandb(drive_root, drive_checkpoint, tmp_path_factory) -> Path:
    """The run directory of `python -m retinaseg.eval` of `drive_checkpoint` at threshold 0.45 with logger=wandb
    (offline), as a user would type it."""
    from helpers.commands import run_entry_point

    directory = tmp_path_factory.mktemp("drive_eval_wandb")
    args = [f"ckpt_path={drive_checkpoint}", f"data.root={drive_root}", "threshold=0.45", "plot_images=0"]
    result = run_entry_point("eval", [*args, "logger=wandb", "bootstrap=500", f"hydra.run.dir={directory}"], directory)
    assert result.returncode == 0, result.stderr
    return directory
