"""`python -m retinaseg.export ckpt_path=<file.ckpt> [format=onnx] [output=probabilities|logits] [file=<path>]`:
the checkpoint's U-Net as an ONNX model for any batch, height and width, and beside it `<name>.json`, what the
model expects (preprocessing) and how its output is read (threshold)."""

import json
import logging
import math
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, check_choice, exit_on_user_error
from retinaseg.core.safe_io import write_atomically, write_text
from retinaseg.data.preprocess import CLAHE_CLIP_LIMIT, CLAHE_TILES
from retinaseg.inference.predictor import Predictor
from retinaseg.model.checkpoint import Checkpoint, load_checkpoint

try:  # the `onnx` extra; onnxscript is what torch's exporter needs, onnx comes with it
    import onnx
    import onnxscript  # noqa: F401
except ImportError:
    onnx = None

config.setup()
log = logging.getLogger(__name__)

FORMATS = ("onnx",)
OUTPUTS = ("probabilities", "logits")


class Probabilities(nn.Module):
    """A network of logits followed by the sigmoid."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).sigmoid()


def to_onnx(net: nn.Module, path: Path, output: str = "probabilities", channels: int = 3) -> None:
    """Write `net` (eval mode; images (N, channels, H, W) -> logits (N, 1, H, W)) to `path` as ONNX, input
    `images` [batch, channels, height, width] float32, output `output` [batch, 1, height, width]."""
    model = (Probabilities(net) if output == "probabilities" else net).eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    # torch.export's exporter (the legacy TorchScript one is deprecated); the U-Net branches on no size, so the
    # graph holds for every size. A batch of 2: an example of 1 would be taken as the only batch size.
    program = torch.onnx.export(
        model,
        (torch.zeros(2, channels, 64, 64),),
        dynamo=True,
        input_names=["images"],
        output_names=[output],
        dynamic_shapes=(dims,),
        verbose=False,
    )
    proto = program.model_proto
    # The exporter names the output's height and width after its own symbols; they are the input's.
    for dim, name in zip(proto.graph.output[0].type.tensor_type.shape.dim, ("batch", None, "height", "width")):
        if name:
            dim.dim_param = name
    write_atomically(path, lambda file: onnx.save_model(proto, file))


def description(checkpoint: Checkpoint, predictor: Predictor, model_file: Path, output: str) -> dict:
    """The JSON beside an exported model: its input, preprocessing, output and binarisation."""
    hparams, pre, binarisation = checkpoint.hyper_parameters, predictor.preprocessing, predictor.binarisation
    threshold = binarisation.threshold
    preprocessing = {
        "steps": "RGB uint8 -> resized by scale (OpenCV INTER_AREA; only if scale != 1) -> CLAHE on the CIE L* "
        "lightness (only if clahe; OpenCV, on the whole image) -> / 255 -> (x - mean) / std per channel -> NCHW "
        "float32; the probabilities resized back (bilinear) to the photograph's size",
        "scale": pre.scale,
        "clahe": pre.clahe,
        "clahe_clip_limit": CLAHE_CLIP_LIMIT,
        "clahe_tiles": list(CLAHE_TILES),
        "mean": list(pre.mean),
        "std": list(pre.std),
    }
    return {
        "model": model_file.name,
        "format": "onnx",
        "input": {"name": "images", "shape": ["batch", hparams.get("in_channels", 3), "height", "width"]},
        "output": {"name": output, "shape": ["batch", 1, "height", "width"], "kind": output},
        "preprocessing": preprocessing,
        "threshold": threshold,
        # A vessel pixel is a probability above `threshold`, i.e. a logit above its logit.
        "logit_threshold": math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else None,
        # Then, on each whole image inside its FOV (retinaseg.inference.binarise): pixels above low_threshold connected
        # (8-connected) to pixels above `threshold` are vessel too (null: off), and 8-connected vessel components
        # of fewer than min_size pixels are dropped (0: none).
        "binarisation": binarisation.to_json(),
        "network": {key: hparams[key] for key in ("in_channels", "base_channels", "depth") if key in hparams},
        "checkpoint": str(checkpoint.path.resolve()),
    }


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
    write_text(sidecar, json.dumps(description(checkpoint, predictor, path, cfg.output), indent=2) + "\n")
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
