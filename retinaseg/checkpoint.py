"""Reading a model file once, without executing pickled code, and rebuilding its model.

Two kinds of file are read: a retinaseg checkpoint (`python -m retinaseg.train` writes them; they carry
the model's and the data's settings), and a plain U-Net state_dict such as the original notebook's
`torch.save(model.state_dict(), "unet.pth")`, read with the original's preprocessing.
"""

import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from retinaseg.data.preprocess import Preprocessing
from retinaseg.errors import ConfigError, DataError
from retinaseg.inference import check_inference
from retinaseg.model import UNet, rename_legacy_keys
from retinaseg.module import VesselSegmentationModule

log = logging.getLogger(__name__)

# A key every retinaseg U-Net has: how a retinaseg checkpoint is told from any other.
MARKER_KEY = "net.e1.conv_block.conv1.weight"
# The original notebook's preprocessing: RGB scaled to [0, 1], no standardisation, no CLAHE.
ORIGINAL_DATA = {"dataset": "drive", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "clahe": False, "scale": 1.0}
# Where a training checkpoint keeps the id and group of the W&B run that wrote it (retinaseg.callbacks.KeepWandbRun):
# a resumed training continues that run, an evaluation joins its group.
WANDB_RUN_ID_KEY = "wandb_run_id"
WANDB_GROUP_KEY = "wandb_group"
WHAT_TO_PASS = (
    "Pass a .ckpt written by `python -m retinaseg.train`, or a U-Net state_dict "
    '(`torch.save(model.state_dict(), "unet.pth")` of the original notebook).'
)


@dataclass(frozen=True)
class Checkpoint:
    """A model file, read once.

    hyper_parameters: VesselSegmentationModule's constructor arguments (plain values).
    data: the data module's settings the model was trained with (at least dataset, mean and std), in the
    current key names.
    state_dict: VesselSegmentationModule's weights (keys `net.*`), in the current key names.
    from_state_dict: True for a plain U-Net state_dict, which records no training split or threshold.
    resumable: True when it holds what training continues from (optimizer and loop state), not weights only.
    wandb_run_id, wandb_group: the W&B run that trained it and its group (None: not logged to W&B); a training
    continued from it logs to that run, an evaluation joins that group.
    """

    path: Path
    hyper_parameters: dict
    data: dict
    state_dict: dict
    from_state_dict: bool = False
    resumable: bool = False
    wandb_run_id: str | None = None
    wandb_group: str | None = None

    def build_module(self, inference: dict | None = None) -> VesselSegmentationModule:
        """The model in eval mode, built from the checkpoint's own hyperparameters.

        `inference` entries that are not None replace the checkpoint's inference settings; compilation is
        switched off (a one-off evaluation would spend longer compiling than predicting).
        """
        hparams = {**self.hyper_parameters, "compile": False}
        overrides = check_inference({k: v for k, v in (inference or {}).items() if v is not None}, "inference")
        hparams["inference"] = {**(hparams.get("inference") or {}), **overrides}
        module = VesselSegmentationModule(**hparams)
        try:
            module.load_state_dict(self.state_dict)
        except RuntimeError as error:
            raise DataError(
                f"the weights of {self.path} do not fit the model its hyper_parameters describe: {error}"
            ) from None
        return module.eval()

    def preprocessing(self) -> Preprocessing:
        """What the model's photographs went through in training: scale, CLAHE, mean and std."""
        return Preprocessing.of(self.data)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The model file at `path`, loaded with `weights_only=True` (tensors and plain values only).

    Keys from before the decoder's `up_conv` kept the original's name are renamed, with a log line.
    """
    if path is None or str(path) == "":
        raise DataError("ckpt_path is not set: pass ckpt_path=<file.ckpt> (e.g. <run dir>/checkpoints/best.ckpt).")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"ckpt_path={path}: no such file (or not a file). {WHAT_TO_PASS}")
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{path} is not a PyTorch file (not the zip archive torch.save writes), or it is truncated. {WHAT_TO_PASS}"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses objects whose unpickling could run code; name the first one instead of loading it.
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise DataError(
            f"{path} holds pickled objects other than tensors and plain values{what}, so it is not loaded and nothing in it was run."
        ) from None
    except Exception as error:  # torch reports damaged archives as RuntimeError, OSError, EOFError, ...
        raise DataError(f"{path} is a damaged PyTorch file: {error}") from None
    checkpoint = _retinaseg_checkpoint(path, content) or _unet_state_dict(path, content)
    if checkpoint is None:
        raise DataError(f"{path} is neither a retinaseg checkpoint nor a state_dict of the U-Net. {WHAT_TO_PASS}")
    renamed = rename_legacy_keys(checkpoint.state_dict)
    if renamed:
        log.info(
            "%s: renamed %d decoder keys `up.*` to the original's `up_conv.*` (written before that rename)",
            path,
            renamed,
        )
    return checkpoint


def _retinaseg_checkpoint(path: Path, content) -> Checkpoint | None:
    if not isinstance(content, dict):
        return None
    state, hparams = content.get("state_dict"), content.get("hyper_parameters")
    if not isinstance(state, dict) or MARKER_KEY not in state or not isinstance(hparams, dict):
        return None
    data = dict(content.get("datamodule_hyper_parameters") or {})
    if "mean" not in data or "std" not in data:
        raise DataError(
            f"{path} has no data.mean/data.std (datamodule_hyper_parameters): it was not written by `python -m retinaseg.train`."
        )
    if "source" in data:  # written before datasets were config groups (data.source: drive or synthetic)
        data["dataset"] = data.pop("source")
    if data.get("folds") is None:  # written when data.fold was 0 by default, ignored without data.folds
        data.pop("fold", None)
    resumable = all(key in content for key in ("optimizer_states", "loops", "epoch", "global_step"))
    return Checkpoint(
        path,
        hparams,
        data,
        state,
        resumable=resumable,
        wandb_run_id=content.get(WANDB_RUN_ID_KEY),
        wandb_group=content.get(WANDB_GROUP_KEY),
    )


def _unet_state_dict(path: Path, content) -> Checkpoint | None:
    """A plain state_dict of `retinaseg.model.UNet` (the original's `build_unet` has the same keys), of any
    width and depth, read with the original's preprocessing and threshold 0.5; None if it is not one."""
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        return None
    state = dict(content)
    rename_legacy_keys(state)
    first = state.get("e1.conv_block.conv1.weight")
    if first is None or first.ndim != 4:
        return None
    size = {
        "in_channels": first.shape[1],
        "base_channels": first.shape[0],
        "depth": len({key.split(".")[0] for key in state if re.match(r"e\d+\.", key)}),
    }
    expected = UNet(
        in_channels=size["in_channels"], base_channels=size["base_channels"], depth=size["depth"]
    ).state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        return None
    log.info(
        "%s is a plain U-Net state_dict: read as the U-Net with %s, the original notebook's preprocessing "
        "(RGB scaled to [0, 1], no standardisation, no CLAHE) and threshold 0.5",
        path,
        ", ".join(f"{k}={v}" for k, v in size.items()),
    )
    hparams = {**size, "threshold": 0.5}
    return Checkpoint(
        path, hparams, dict(ORIGINAL_DATA), {f"net.{k}": v for k, v in content.items()}, from_state_dict=True
    )


def resolve_device(device: str) -> torch.device:
    """`auto`: the GPU where there is one, else the CPU; otherwise the named device, which must exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device={device!r} is not a device: {error}. Use auto, cpu, cuda or cuda:<n>.") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={device} but this machine has no usable GPU: use device=auto or device=cpu.")
        if (resolved.index or 0) >= count:
            raise ConfigError(f"device={device} but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}.")
    return resolved
