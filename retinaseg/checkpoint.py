"""Loading a trained model from a retinaseg checkpoint, without executing pickled code."""

import pickle
import re
import zipfile
from pathlib import Path

import torch

from retinaseg.errors import DataError
from retinaseg.module import VesselSegmentationModule

# A key every retinaseg U-Net has: how a retinaseg checkpoint is told from any other.
MARKER_KEY = "net.e1.conv_block.conv1.weight"


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path` as a dict, loaded with `weights_only=True` (tensors and plain values only)."""
    if path is None or str(path) == "":
        raise DataError("ckpt_path is not set: pass ckpt_path=<file.ckpt> (e.g. <run dir>/checkpoints/best.ckpt).")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"ckpt_path={path}: no such file (or not a file). Pass a .ckpt written by `python -m retinaseg.train`.")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a PyTorch checkpoint (not the zip archive torch.save writes), or it is truncated. Pass a .ckpt written by `python -m retinaseg.train`.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses objects whose unpickling could run code; name the first one instead of loading it.
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise DataError(f"{path} holds pickled objects other than tensors and plain values{what}, so it is not loaded and nothing in it was run.") from None
    except Exception as error:  # torch reports damaged archives as RuntimeError, OSError, EOFError, ...
        raise DataError(f"{path} is a damaged PyTorch checkpoint: {error}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or MARKER_KEY not in state or not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise DataError(f"{path} is not a retinaseg checkpoint (no U-Net weights and hyper_parameters in it). Pass a .ckpt written by `python -m retinaseg.train`.")
    return checkpoint


def build_module(checkpoint: dict, inference: dict | None = None) -> VesselSegmentationModule:
    """The checkpoint's model in eval mode, built from its own hyperparameters.

    `inference` entries that are not None replace the checkpoint's inference settings; compilation is
    switched off (a one-off evaluation would spend longer compiling than predicting).
    """
    hparams = {**checkpoint["hyper_parameters"], "compile": False}
    hparams["inference"] = {**(hparams.get("inference") or {}), **{k: v for k, v in (inference or {}).items() if v is not None}}
    module = VesselSegmentationModule(**hparams)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise DataError(f"the checkpoint's weights do not fit the model its hyper_parameters describe: {error}") from None
    return module.eval()


def resolve_device(device: str) -> torch.device:
    """`auto`: the GPU where there is one, else the CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise DataError(f"device={device!r} is not a device: {error}. Use auto, cpu, cuda or cuda:<n>.") from None


def normalisation(checkpoint: dict) -> tuple[list[float], list[float], bool]:
    """The per-channel mean and std the checkpoint's model was trained with (its data.mean, data.std), and
    whether its images were contrast-equalised (data.clahe)."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    if "mean" not in data or "std" not in data:
        raise DataError("the checkpoint has no data.mean/data.std (datamodule_hyper_parameters): it was not written by `python -m retinaseg.train`.")
    return list(data["mean"]), list(data["std"]), bool(data.get("clahe", False))
