"""retinaseg: U-Net retinal vessel segmentation on DRIVE with Lightning and Hydra."""

import os

# albumentations checks PyPI for a newer release on import; this project never touches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
