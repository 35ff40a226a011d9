"""`python -m retinaseg.package_model ckpt_path=<file.ckpt> folder=<folder> [min_size=N] [hysteresis=F] [bridge=C]`: a trained
checkpoint as a packaged model, the form of `retinaseg/pretrained/drive/`: its weights in safetensors
(model.safetensors), and in model.json its model and data settings (with the binarisation given here, if any) and
the ranges of brightness, contrast, vessel density and FOV width over its training photographs
(retinaseg.inference.quality), which predict checks each photograph against."""

import dataclasses
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, exit_on_user_error
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.inference.quality import references
from retinaseg.model.checkpoint import (
    PACKAGED_SETTINGS,
    PACKAGED_WEIGHTS,
    data_settings,
    load_checkpoint,
    save_pretrained,
)

config.setup()
log = logging.getLogger(__name__)


def package_model(cfg: DictConfig) -> list[Path]:
    """Write the packaged model of `cfg.ckpt_path` into `cfg.folder`; return the files written."""
    folder = Path(cfg.folder).expanduser()
    existing = [folder / name for name in (PACKAGED_WEIGHTS, PACKAGED_SETTINGS) if (folder / name).exists()]
    if existing:
        raise ConfigError(f"{existing[0]} exists and is not overwritten: choose another folder=<path>.")
    checkpoint = load_checkpoint(cfg.ckpt_path)
    if checkpoint.from_state_dict:
        raise ConfigError(
            f"{checkpoint.path} is a plain state_dict, which does not record its training images: package a "
            "checkpoint written by `python -m retinaseg.train`."
        )
    # The binarisation given here, checked as the predictor checks it, becomes the packaged model's own.
    predictor = checkpoint.predictor(
        torch.device("cpu"), hysteresis=cfg.hysteresis, min_size=cfg.min_size, bridge=cfg.bridge
    )
    own = predictor.binarisation
    binarisation = {"hysteresis": own.hysteresis, "min_size": own.min_size, "bridge": own.bridge}
    checkpoint = dataclasses.replace(checkpoint, hyper_parameters={**checkpoint.hyper_parameters, **binarisation})
    own, _ = data_settings(checkpoint, OmegaConf.to_container(cfg.data, resolve=True))
    data = FundusDataModule(**own)
    # All the photographs of its training split: those it trained on and those held out for validation.
    samples = list(data.catalogue.read(data.ids("train") + data.ids("val")))
    log.info(
        "measuring the model's %d training photographs (%s) for its reference ranges", len(samples), own["dataset"]
    )
    ranges = references(dataclasses.replace(predictor, preprocessing=data.preprocessing), samples, own["dataset"])
    written = save_pretrained(checkpoint, folder, ranges)
    log.info(
        "packaged model of %s written: %s; reference ranges %s", checkpoint.path, ", ".join(map(str, written)), ranges
    )
    return written


@hydra.main(version_base="1.3", config_path="conf", config_name="package_model")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        package_model(cfg)


if __name__ == "__main__":
    main()
