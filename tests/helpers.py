"""Helpers shared by the tests: composing the project's Hydra configs as the entry points do, running an
entry point as a user would, small datasets in DRIVE's layout, and the original network."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from retinaseg.data.synthetic import synthetic_samples

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# ../shared/seed next to the project: the original notebook's network, verbatim (see its README.md).
SEED_DIR = Path(__file__).resolve().parents[2] / "shared" / "seed"

# A tiny but real configuration: small U-Net, few small synthetic images, one short epoch.
TINY = [
    "model.base_channels=4",
    "model.depth=2",
    "data.patch_size=32",
    "data.patches_per_epoch=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.precision=32-true",
]
TINY_SYNTHETIC = TINY + [
    "data=synthetic",
    "data.synthetic_images=4",
    "data.synthetic_size=[96,96]",
    "data.val_images=1",
]


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_entry_point(name: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m retinaseg.<name> <args>` in `cwd`, as a user would type it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"retinaseg.{name}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def run_module(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m retinaseg.train <args>`."""
    return run_entry_point("train", args, cwd, **env)


def make_drive(root: Path, numbers=(21, 22), split: str = "training", size=(48, 40)) -> Path:
    """A DRIVE-layout folder (tif images, gif labels and masks, DRIVE's names) of small synthetic images."""
    for folder in ("images", "1st_manual", "mask"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for number, s in zip(numbers, synthetic_samples(len(numbers), height=size[0], width=size[1])):
        Image.fromarray(s.image).save(root / split / "images" / f"{number:02d}_{split}.tif")
        Image.fromarray(s.label * 255).save(root / split / "1st_manual" / f"{number:02d}_manual1.gif")
        Image.fromarray(s.fov.astype(np.uint8) * 255).save(root / split / "mask" / f"{number:02d}_{split}_mask.gif")
    return root


def seed_unet():
    """The original notebook's module `seed_unet` (build_unet, dice_loss), imported from ../shared/seed.

    Not skipped when missing: every checkout this project is tested in has ../shared next to it.
    """
    if not (SEED_DIR / "seed_unet.py").is_file():
        raise FileNotFoundError(f"the original network is expected at {SEED_DIR / 'seed_unet.py'} (../shared/seed)")
    if str(SEED_DIR) not in sys.path:
        sys.path.insert(0, str(SEED_DIR))
    return importlib.import_module("seed_unet")
