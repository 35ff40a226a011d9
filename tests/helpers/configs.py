"""The project's Hydra configs composed as the entry points compose them, and a tiny but real configuration."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from retinaseg.core import config

CONF = str(Path(__file__).resolve().parents[2] / "retinaseg" / "conf")

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
    """The entry point `name`'s config with `overrides`, its run directory `output_dir` (Hydra's callbacks, which
    claim the run directory, do not run)."""
    config.setup()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg
