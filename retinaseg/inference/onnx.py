"""A model as an ONNX file for other runtimes, with the JSON that says what it expects and how its output is read
(`python -m retinaseg.export`)."""

import math
from pathlib import Path

import torch
from torch import nn

from retinaseg.core.safe_io import write_atomically
from retinaseg.data.preprocess import CLAHE_CLIP_LIMIT, CLAHE_TILES
from retinaseg.inference.predictor import Predictor


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
    import onnx  # the `onnx` extra, which `python -m retinaseg.export` checks for first

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


def description(predictor: Predictor, hparams: dict, source: Path, model_file: Path, output: str) -> dict:
    """The JSON beside an exported model: its input, preprocessing, output and binarisation (`predictor`'s), and its
    network (`hparams`, the model's hyperparameters) and `source` (the model file it came from)."""
    pre, binarisation = predictor.preprocessing, predictor.binarisation
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
        # (8-connected) to pixels above `threshold` are vessel too (null: off); 8-connected vessel components of
        # fewer than min_size pixels are joined to the larger ones along the cheapest path costing at most `bridge`
        # (a pixel costs 1 - its probability; 0: none joined), and those still smaller are dropped (0: none).
        "binarisation": binarisation.to_json(),
        "network": {key: hparams[key] for key in ("in_channels", "base_channels", "depth") if key in hparams},
        "checkpoint": str(source.resolve()),
    }
