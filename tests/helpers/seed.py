"""The original notebook's network, which the U-Net and the checkpoint formats are checked against."""

import importlib
import sys
from pathlib import Path

# ../shared/seed next to the project: the original notebook's network, verbatim (see its README.md).
SEED_DIR = Path(__file__).resolve().parents[3] / "shared" / "seed"


def seed_unet():
    """The original notebook's module `seed_unet` (build_unet, dice_loss), imported from ../shared/seed.

    Not skipped when missing: every checkout this project is tested in has ../shared next to it.
    """
    if not (SEED_DIR / "seed_unet.py").is_file():
        raise FileNotFoundError(f"the original network is expected at {SEED_DIR / 'seed_unet.py'} (../shared/seed)")
    if str(SEED_DIR) not in sys.path:
        sys.path.insert(0, str(SEED_DIR))
    return importlib.import_module("seed_unet")
