"""Reading a model file once, without executing pickled code, and rebuilding its model.

Two kinds of file are read: a retinaseg checkpoint (`python -m retinaseg.train` writes them; they carry
the model's and the data's settings), and a plain U-Net state_dict such as the original notebook's
`torch.save(model.state_dict(), "unet.pth")`, read with the original's preprocessing. And the models that come
with the package, by name (`pretrained:drive`): a checkpoint's weights in safetensors and its settings in JSON.
"""

import dataclasses
import inspect
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from retinaseg.core.errors import ConfigError, DataError
from retinaseg.core.safe_io import write_atomically, write_text
from retinaseg.data import sources
from retinaseg.data.preprocess import Preprocessing
from retinaseg.inference.backends import on_backend
from retinaseg.inference.binarise import Binarisation
from retinaseg.inference.predictor import Predictor
from retinaseg.inference.quality import References
from retinaseg.inference.settings import InferenceSettings
from retinaseg.model.module import VesselSegmentationModule
from retinaseg.model.unet import UNet, rename_legacy_keys

log = logging.getLogger(__name__)

# A key every retinaseg U-Net has: how a retinaseg checkpoint is told from any other.
MARKER_KEY = "net.e1.conv_block.conv1.weight"
# The original notebook's preprocessing: RGB scaled to [0, 1], no standardisation, no CLAHE.
ORIGINAL_DATA = {"dataset": "drive", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "clahe": False, "scale": 1.0}
# Where a training checkpoint keeps the id and group of the W&B run that wrote it (retinaseg.tracking.callbacks.KeepWandbRun):
# a resumed training continues that run, an evaluation joins its group.
WANDB_RUN_ID_KEY = "wandb_run_id"
WANDB_GROUP_KEY = "wandb_group"
# The models packaged with retinaseg, one folder each under PRETRAINED_DIR, named `pretrained:<folder>` wherever a
# checkpoint path is accepted: weights without pickle (safetensors) and the checkpoint's settings (JSON).
PRETRAINED = "pretrained:"
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
PACKAGED_WEIGHTS, PACKAGED_SETTINGS = "model.safetensors", "model.json"
WHAT_TO_PASS = (
    "Pass a .ckpt written by `python -m retinaseg.train`, a U-Net state_dict "
    '(`torch.save(model.state_dict(), "unet.pth")` of the original notebook), or a packaged model (pretrained:drive).'
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
    name: a packaged model's name (`pretrained:drive`), None for a file given by its path.
    references: the ranges of its training photographs a photograph is checked against (retinaseg.inference.quality);
    None where it records none (only packaged models do).
    """

    path: Path
    hyper_parameters: dict
    data: dict
    state_dict: dict
    from_state_dict: bool = False
    resumable: bool = False
    wandb_run_id: str | None = None
    wandb_group: str | None = None
    name: str | None = None
    references: References | None = None

    def build_module(self) -> VesselSegmentationModule:
        """The model in eval mode, built from the checkpoint's own hyperparameters; compilation is switched off (a
        one-off evaluation would spend longer compiling than predicting)."""
        module = VesselSegmentationModule(**{**self.hyper_parameters, "compile": False})
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

    def predictor(
        self,
        device: torch.device,
        inference: Mapping | None = None,
        tta: bool = False,
        threshold: float | None = None,
        hysteresis: float | None = None,
        min_size: int | None = None,
        bridge: float | None = None,
        scale: float | None = None,
    ) -> Predictor:
        """The model ready to predict on `device`, as eval and predict run it. Each setting that is None is the
        checkpoint's own: `inference` holds the inference group's settings (mode, window, overlap, batch_size,
        weighting, backend, precision), `threshold`, `hysteresis`, `min_size` and `bridge` the binarisation's (checked here),
        `scale` the photographs' resize factor (checked by the caller, who names it)."""
        settings = dict(inference or {})
        backend, precision = settings.pop("backend", None) or "torch", settings.pop("precision", None) or "fp32"
        module = self.build_module().to(device)
        own = module.binarisation
        binarisation = Binarisation.checked(
            own.threshold if threshold is None else threshold,
            own.hysteresis if hysteresis is None else hysteresis,
            own.min_size if min_size is None else min_size,
            own.bridge if bridge is None else bridge,
        )
        preprocessing = self.preprocessing()
        return Predictor(
            runtime=on_backend(module.net, backend, precision, module.hparams.in_channels),
            inference=InferenceSettings.of(settings, "inference", base=module.inference),
            binarisation=binarisation,
            tta=tta,
            preprocessing=preprocessing if scale is None else dataclasses.replace(preprocessing, scale=scale),
            base_channels=module.hparams.base_channels,
            device=device,
            net=module.net,
        )


# The model's own preprocessing, always the checkpoint's (data.scale belongs to the dataset scored).
MODEL_PREPROCESSING = ("mean", "std", "clahe")


def data_settings(checkpoint: Checkpoint, data: dict) -> tuple[dict, dict]:
    """(own, target): the checkpoint's data settings (its dataset and split, where its validation images come
    from) and the settings of the images to score.

    Without `data=<name>` the target is the checkpoint's own dataset, with the non-null data.* overrides. With it
    (`data` then holds that dataset's whole config), the target is that dataset as configured (reader, root, split,
    scale) with the checkpoint's mean, std and CLAHE. A dataset path of the checkpoint's that does not exist here (a
    checkpoint from another machine, or none recorded) is replaced by the dataset's environment variable
    ($DRIVE_ROOT, ...) unless data.root is given.
    """
    own = dict(checkpoint.data)
    chosen = "dataset" in data
    if not chosen:
        own.update({key: value for key, value in data.items() if value is not None})
    env = sources.root_env(own["dataset"])
    if (chosen or data.get("root") is None) and env and os.environ.get(env) and not Path(str(own.get("root"))).exists():
        missing = (
            "the checkpoint records no data.root"  # a packaged model (pretrained:<name>)
            if own.get("root") is None
            else f"the checkpoint's data.root {own['root']} does not exist here"
        )
        log.info("%s; using %s=%s", missing, env, os.environ[env])
        own["root"] = os.environ[env]
    if not chosen:
        return own, own
    target = {key: value for key, value in data.items() if key != "_target_"}
    return own, {**target, **{key: own[key] for key in MODEL_PREPROCESSING if key in own}}


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The model file at `path`, loaded with `weights_only=True` (tensors and plain values only).

    Keys from before the decoder's `up_conv` kept the original's name are renamed, with a log line.
    """
    if path is None or str(path) == "":
        raise DataError(
            "ckpt_path is not set: pass ckpt_path=<file.ckpt> (e.g. <run dir>/checkpoints/best.ckpt) or ckpt_path=pretrained:drive."
        )
    if str(path).startswith(PRETRAINED):
        return load_pretrained(str(path))
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"ckpt_path={path}: no such file (or not a file). {WHAT_TO_PASS}")
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{path} is not a PyTorch file (not the zip archive torch.save writes), or it is truncated. {WHAT_TO_PASS}"
        )
    try:
        # torch.load does not check the archive's CRCs: damaged weights would load as other numbers.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as error:
        raise DataError(f"{path} is a damaged PyTorch file: {error}") from None
    if damaged is not None:
        raise DataError(
            f"{path} is a damaged PyTorch file: {damaged} fails its CRC check. Replace it with a good copy."
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
    not_finite = [
        key
        for key, value in checkpoint.state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.isfinite().all()
    ]
    if not_finite:
        raise DataError(
            f"{path} holds weights that are not finite (NaN or infinity) in {', '.join(not_finite[:3])}"
            f"{' and more' if len(not_finite) > 3 else ''}: the model would predict nothing. Use an earlier checkpoint."
        )
    renamed = rename_legacy_keys(checkpoint.state_dict)
    if renamed:
        log.info(
            "%s: renamed %d decoder keys `up.*` to the original's `up_conv.*` (written before that rename)",
            path,
            renamed,
        )
    return checkpoint


def pretrained_names() -> list[str]:
    """The packaged models, by the name ckpt_path takes (`pretrained:drive`, ...)."""
    return sorted(PRETRAINED + p.name for p in PRETRAINED_DIR.iterdir() if (p / PACKAGED_SETTINGS).is_file())


def load_pretrained(name: str) -> Checkpoint:
    """The packaged model `name` (`pretrained:<folder>`), as a checkpoint holding its weights only."""
    if name not in pretrained_names():
        raise ConfigError(
            f"ckpt_path={name}: retinaseg has no packaged model of that name; the packaged models are {', '.join(pretrained_names())}."
        )
    folder = PRETRAINED_DIR / name.removeprefix(PRETRAINED)
    try:
        settings = json.loads((folder / PACKAGED_SETTINGS).read_text())
        state = safetensors.torch.load_file(folder / PACKAGED_WEIGHTS)
        references = settings.get("references")
        return Checkpoint(
            folder / PACKAGED_WEIGHTS,
            settings["hyper_parameters"],
            current_data_settings(settings["data"]),
            state,
            name=name,
            references=References.of(references) if references else None,
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise DataError(f"{folder}, the files of {name}, cannot be read ({error!r}): reinstall retinaseg.") from None


def save_pretrained(checkpoint: Checkpoint, folder: Path, references: References) -> list[Path]:
    """`checkpoint` as a packaged model in `folder` (made if needed): its weights (PACKAGED_WEIGHTS), and its model
    and data settings with the `references` of its training photographs (PACKAGED_SETTINGS). Returns both paths."""
    # safetensors stores tensors as laid out in memory: the channels_last weights are made contiguous first.
    weights = safetensors.torch.save({key: value.contiguous() for key, value in checkpoint.state_dict.items()})
    settings = {
        "weights": PACKAGED_WEIGHTS,
        "hyper_parameters": checkpoint.hyper_parameters,
        # data.root is a folder of the training machine: eval reads $DRIVE_ROOT (or data.root=) instead.
        "data": {**checkpoint.data, "root": None},
        "references": references.to_dict(),
    }
    return [
        write_atomically(folder / PACKAGED_WEIGHTS, lambda file: file.write(weights)),
        write_text(folder / PACKAGED_SETTINGS, json.dumps(settings, indent=2) + "\n"),
    ]


def current_data_settings(data: dict) -> dict:
    """A checkpoint's (or packaged model's) data settings as this version names them."""
    data = dict(data)
    if "source" in data:  # written before datasets were config groups (data.source: drive or synthetic)
        data["dataset"] = data.pop("source")
    if data.get("folds") is None:  # written when data.fold was 0 by default, ignored without data.folds
        data.pop("fold", None)
    return data


def _retinaseg_checkpoint(path: Path, content) -> Checkpoint | None:
    if not isinstance(content, dict):
        return None
    state, hparams = content.get("state_dict"), content.get("hyper_parameters")
    if not isinstance(state, dict) or MARKER_KEY not in state or not isinstance(hparams, dict):
        return None
    check_hyper_parameters(path, hparams)
    data = dict(content.get("datamodule_hyper_parameters") or {})
    if "mean" not in data or "std" not in data:
        raise DataError(
            f"{path} has no data.mean/data.std (datamodule_hyper_parameters): it was not written by `python -m retinaseg.train`."
        )
    data = current_data_settings(data)
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


def check_hyper_parameters(path: Path, hparams: dict) -> None:
    """Refuses hyper_parameters that VesselSegmentationModule would not take: entries it does not know (written by
    another version, or edited), or an `inference` that is not a mapping of settings."""
    known = inspect.signature(VesselSegmentationModule).parameters
    unknown = sorted(str(key) for key in hparams if key not in known)
    if unknown:
        raise DataError(
            f"{path} has hyper_parameters this retinaseg does not know ({', '.join(unknown)}): it was written by "
            "another version, or edited. Use a checkpoint of this version."
        )
    inference = hparams.get("inference")
    if inference is not None and not isinstance(inference, Mapping):
        raise DataError(
            f"{path} has hyper_parameters.inference={inference!r}, not a mapping of inference settings: it was edited "
            "or damaged. Use another checkpoint."
        )


def _unet_state_dict(path: Path, content) -> Checkpoint | None:
    """A plain state_dict of `retinaseg.model.unet.UNet` (the original's `build_unet` has the same keys), of any
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
