"""retinaseg.export: an ONNX model for any batch, height and width that computes what torch computes, and a JSON
of its preprocessing and threshold. Skipped only where the `onnx` and `openvino` extras (which runs the ONNX
file here) are not installed; CI installs both."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.checkpoints import write_checkpoint
from helpers.commands import run_entry_point
from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.core.errors import ConfigError
from retinaseg.export import export
from retinaseg.inference.backends import compiled_for_cpu
from retinaseg.inference.onnx import description
from retinaseg.model.checkpoint import load_checkpoint
from retinaseg.model.unet import UNet

pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small U-Net's state_dict (read as the notebook's: RGB / 255, no CLAHE, threshold 0.5)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "unet.pth"
    torch.save(UNet(3, 1, base_channels=4, depth=2).state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_onnx_model_computes_what_torch_computes_at_any_size(weights, tmp_path, output):
    pytest.importorskip("openvino")
    path = export(compose_config("export", [f"ckpt_path={weights}", f"output={output}"], tmp_path))
    assert path == tmp_path / "model.onnx"
    compiled = compiled_for_cpu(str(path), "fp32")
    (images,), (result,) = compiled.inputs, compiled.outputs
    assert (images.get_any_name(), result.get_any_name()) == ("images", output)
    assert str(images.get_partial_shape()) == "[?,3,?,?]"

    net = load_checkpoint(weights).build_module().net
    # Batches of 1 to 3, sizes that are and are not multiples of the U-Net's 2**depth (the example's was).
    for shape in ((1, 3, 37, 53), (3, 3, 64, 64), (2, 3, 17, 90), (1, 3, 100, 4)):
        x = torch.randn(shape)
        with torch.inference_mode():
            expected = net(x) if output == "logits" else net(x).sigmoid()
        actual = compiled(x.numpy())[0]
        assert actual.shape == expected.shape
        assert np.abs(actual - expected.numpy()).max() < 1e-4

    about = json.loads((tmp_path / "model.json").read_text())
    assert about["model"] == "model.onnx" and about["output"]["kind"] == output
    assert about["input"]["shape"] == ["batch", 3, "height", "width"]
    pre = about["preprocessing"]
    assert pre["mean"] == [0.0, 0.0, 0.0] and pre["std"] == [1.0, 1.0, 1.0] and pre["clahe"] is False
    assert about["threshold"] == 0.5 and math.isclose(about["logit_threshold"], 0.0)


def test_the_json_holds_a_checkpoints_own_preprocessing(tmp_path):
    # A checkpoint as a run saves it (not trained: only its recorded settings are read), with its own preprocessing.
    cfg = compose_config("train", TINY_SYNTHETIC + ["data.clahe=true", "data.mean=[0.1,0.2,0.3]"], tmp_path)
    checkpoint = load_checkpoint(write_checkpoint(tmp_path / "model.ckpt", cfg))
    about = description(
        checkpoint.predictor(torch.device("cpu")),
        checkpoint.hyper_parameters,
        checkpoint.path,
        Path("model.onnx"),
        "probabilities",
    )
    data = checkpoint.data
    assert about["preprocessing"]["mean"] == list(data["mean"]) and about["preprocessing"]["std"] == list(data["std"])
    assert about["preprocessing"]["clahe"] == data["clahe"] and about["network"]["base_channels"] == 4
    assert about["preprocessing"]["scale"] == data["scale"] == 1.0


def test_export_never_overwrites_and_checks_its_settings(weights, tmp_path):
    existing = tmp_path / "mine.onnx"
    existing.write_text("not to be lost")
    with pytest.raises(ConfigError, match="exists and is not overwritten"):
        export(compose_config("export", [f"ckpt_path={weights}", f"file={existing}"], tmp_path))
    assert existing.read_text() == "not to be lost"
    with pytest.raises(ConfigError, match="output must be one of probabilities, logits"):
        export(compose_config("export", [f"ckpt_path={weights}", "output=mask"], tmp_path))
    with pytest.raises(ConfigError, match="format must be one of onnx"):
        export(compose_config("export", [f"ckpt_path={weights}", "format=tflite"], tmp_path))


@pytest.mark.slow
def test_the_command_prints_only_what_it_wrote(weights, tmp_path):
    # torch's exporter otherwise logs a line per folded constant, per torchvision operator it skips, and more.
    result = run_entry_point("export", [f"ckpt_path={weights}", f"file={tmp_path / 'mine.onnx'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    printed = (result.stdout + result.stderr).splitlines()
    assert all("][retinaseg." in line or "][__main__][" in line for line in printed), printed
    assert "mine.onnx (probabilities) and" in printed[-1]


def test_a_json_model_name_is_refused_before_anything_is_written(weights, tmp_path):
    with pytest.raises(
        ConfigError, match=r"model.json: the model's description is written beside it .*file=.*model\.onnx"
    ):
        export(compose_config("export", [f"ckpt_path={weights}", f"file={tmp_path / 'model.json'}"], tmp_path))
    assert not (tmp_path / "model.json").exists()


@pytest.mark.slow
def test_an_interrupted_export_leaves_nothing_half_done(weights, tmp_path, monkeypatch):
    cfg = compose_config("export", [f"ckpt_path={weights}"], tmp_path)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("retinaseg.export.to_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(cfg)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # A process killed outright leaves the description without its model: the next export completes the pair.
    (tmp_path / "model.json").write_text(json.dumps({"model": "model.onnx", "format": "onnx"}))
    assert export(cfg) == tmp_path / "model.onnx"
    assert json.loads((tmp_path / "model.json").read_text())["threshold"] == 0.5
    # A .json of the user's own is not taken for one.
    (tmp_path / "other.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match="other.json exists and is not overwritten"):
        export(compose_config("export", [f"ckpt_path={weights}", f"file={tmp_path / 'other.onnx'}"], tmp_path))
