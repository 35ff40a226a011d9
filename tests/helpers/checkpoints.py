"""A retinaseg checkpoint written as a run saves it, without training."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


def write_checkpoint(path: Path, cfg: DictConfig, resumable: bool = True) -> Path:
    """A retinaseg checkpoint of the untrained model and the data settings of training config `cfg`, as a run
    would save it, without training: `resumable` adds the (empty) optimizer and loop state a resume needs."""
    from retinaseg.model.module import VesselSegmentationModule

    model, data = (
        {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items() if k != "_target_"}
        for group in ("model", "data")
    )
    torch.manual_seed(0)
    module = VesselSegmentationModule(**model)
    content = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": data,
    }
    if resumable:
        content.update(epoch=0, global_step=2, optimizer_states=[], lr_schedulers=[], loops={}, callbacks={})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path
