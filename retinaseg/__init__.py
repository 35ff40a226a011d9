"""retinaseg: U-Net retinal vessel segmentation on DRIVE with Lightning and Hydra."""

__version__ = "0.1.0"
