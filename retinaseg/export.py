"""`python -m retinaseg.export ckpt_path=<file.ckpt> [format=onnx] [output=probabilities|logits] [file=<path>]`:
the checkpoint's U-Net as an ONNX model for any batch, height and width, and beside it `<name>.json`, what the
model expects (preprocessing) and how its output is read (threshold)."""

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, check_choice, exit_on_user_error
from retinaseg.core.safe_io import write_text
from retinaseg.inference.onnx import description, to_onnx
from retinaseg.model.checkpoint import load_checkpoint

try:  # the `onnx` extra; onnxscript is what torch's exporter needs, onnx comes with it
    import onnx
    import onnxscript  # noqa: F401
except ImportError:
    onnx = None

config.setup()
log = logging.getLogger(__name__)

FORMATS = ("onnx",)
OUTPUTS = ("probabilities", "logits")


def left_unfinished(sidecar: Path, model_file: Path) -> bool:
    """True when `sidecar` is the description of `model_file` written by an export that did not finish (the
    model file is missing)."""
    try:
        about = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(about, dict) and about.get("model") == model_file.name and not model_file.exists()


def export(cfg: DictConfig) -> Path:
    """Write the model file and its JSON; return the model file's path."""
    check_choice("format", cfg.format, FORMATS)
    check_choice("output", cfg.output, OUTPUTS)
    path = Path(cfg.file).expanduser()
    sidecar = path.with_suffix(".json")
    if path.suffix.lower() == ".json":
        raise ConfigError(
            f"file={cfg.file}: the model's description is written beside it as <name>.json, which is the model's "
            f"own name. Give the model another suffix (file={path.with_suffix('.' + cfg.format)})."
        )
    existing = [p for p in (path, sidecar) if p.exists() and not (p == sidecar and left_unfinished(sidecar, path))]
    if existing:
        raise ConfigError(f"{existing[0]} exists and is not overwritten: choose another file=<path>.")
    if onnx is None:
        raise ConfigError("format=onnx needs onnx and onnxscript (torch's ONNX exporter): pip install -e '.[onnx]'.")
    checkpoint = load_checkpoint(cfg.ckpt_path)
    predictor = checkpoint.predictor(torch.device("cpu"))
    # The description first, the model last: where the model is, its description is too. A description whose
    # model an interruption kept from being written is removed, or (SIGKILL) replaced by the next export.
    write_text(
        sidecar,
        json.dumps(description(predictor, checkpoint.hyper_parameters, checkpoint.path, path, cfg.output), indent=2)
        + "\n",
    )
    try:
        to_onnx(predictor.net, path, cfg.output, checkpoint.hyper_parameters.get("in_channels", 3))
    except BaseException:
        sidecar.unlink(missing_ok=True)
        raise
    log.info("%s (%s) and %s written from %s", path, cfg.output, sidecar, checkpoint.path)
    return path


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        export(cfg)


if __name__ == "__main__":
    main()
