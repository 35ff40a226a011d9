"""Inference backends (retinaseg.inference.backends.on_backend): OpenVINO runs the U-Net as torch does (probabilities
within 1e-3, the same metrics to 3 decimals) in eval and predict; auto chooses one; a missing OpenVINO is one
clear error. The OpenVINO tests skip only where the `openvino` extra is not installed (CI installs it)."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.configs import compose_config
from retinaseg.core.errors import ConfigError
from retinaseg.eval import evaluate
from retinaseg.evaluation.counts import REPORTED
from retinaseg.inference.backends import on_backend
from retinaseg.inference.settings import InferenceSettings
from retinaseg.inference.windows import predict_probabilities
from retinaseg.model.unet import UNet
from retinaseg.predict import predict


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, base_channels=4, depth=2).eval()


@pytest.fixture
def openvino():
    return pytest.importorskip("openvino")


# fp32 is the contract; bf16 trades exactness for speed (differences up to ~0.1 seen on a trained model).
@pytest.mark.slow
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("bf16", 0.1)])
def test_openvino_probabilities_match_torch(openvino, net, precision, tolerance):
    runtime = on_backend(net, "openvino", precision)
    assert (runtime.backend, runtime.precision) == ("openvino", precision)
    # Batches of 1 to 3, sizes that are and are not multiples of the U-Net's 2**depth, whole and tiled.
    for images in (torch.randn(1, 3, 37, 53), torch.randn(3, 3, 64, 64), torch.randn(2, 3, 17, 90)):
        for mode in ("whole", "sliding"):
            expected = predict_probabilities(net, images, InferenceSettings(mode=mode, window=32, batch_size=2))
            actual = predict_probabilities(runtime, images, InferenceSettings(mode=mode, window=32, batch_size=2))
            assert actual.shape == expected.shape and actual.dtype == torch.float32
            assert (actual - expected).abs().max() < tolerance


def test_torch_bf16_runs_under_autocast(net):
    images = torch.randn(1, 3, 40, 44)
    runtime = on_backend(net, "torch", "bf16")
    probs = predict_probabilities(runtime, images)
    assert probs.dtype == torch.float32 and (probs - predict_probabilities(net, images)).abs().max() < 0.1


@pytest.mark.slow
def test_auto_chooses_a_backend_by_timing_it(openvino, net, caplog):
    caplog.set_level("INFO", logger="retinaseg.inference.backends")
    runtime = on_backend(net, "auto")
    assert runtime.backend in ("torch", "openvino")
    assert f"inference.backend=auto: {runtime.backend}" in caplog.text
    images = torch.randn(1, 3, 37, 53)
    assert (predict_probabilities(runtime, images) - predict_probabilities(net, images)).abs().max() < 1e-3


def test_without_openvino_backend_openvino_is_one_clear_error_and_auto_is_torch(net, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails as if it were not installed
    with pytest.raises(
        ConfigError, match=r"""needs OpenVINO, which is not installed: pip install -e '\.\[openvino\]'"""
    ):
        on_backend(net, "openvino")
    assert on_backend(net, "auto").backend == "torch"


@pytest.mark.parametrize(("backend", "precision"), [("onnxruntime", "fp32"), ("torch", "fp16")])
def test_unknown_backend_or_precision_is_refused(net, backend, precision):
    with pytest.raises(ConfigError, match="inference.(backend|precision) must be one of"):
        on_backend(net, backend, precision)


@pytest.mark.slow
def test_eval_on_openvino_gives_the_metrics_of_torch(openvino, drive_root, drive_checkpoint, tmp_path):
    results = {}
    for backend in ("torch", "openvino"):
        # The 4 validation images: as good a test of the backend as the 20 test images, in a fifth of the time.
        overrides = [f"ckpt_path={drive_checkpoint}", f"data.root={drive_root}", "split=val", "plot_images=0"]
        results[backend] = evaluate(
            compose_config("eval", [*overrides, f"inference.backend={backend}"], tmp_path / backend)
        )
    assert results["openvino"]["inference"]["backend"] == "openvino"
    to_3_decimals = {backend: {k: round(metrics[k], 3) for k in REPORTED} for backend, metrics in results.items()}
    assert to_3_decimals["torch"] == to_3_decimals["openvino"]
    torch_probs, openvino_probs = (np.load(tmp_path / backend / "probabilities.npz") for backend in results)
    assert max(np.abs(torch_probs[k] - openvino_probs[k]).max() for k in torch_probs.files) < 1e-3


@pytest.mark.slow
def test_predict_on_openvino_writes_the_maps_of_torch(openvino, drive_root, drive_checkpoint, tmp_path):
    photo = sorted((drive_root / "test" / "images").iterdir())[0]
    for backend in ("torch", "openvino"):
        overrides = [f"ckpt_path={drive_checkpoint}", f"input={photo}", f"inference.backend={backend}"]
        predict(compose_config("predict", overrides + [f"output_dir={tmp_path / backend}"], tmp_path / backend))
    torch_prob, openvino_prob = (
        np.asarray(Image.open(tmp_path / backend / f"{photo.stem}_prob.png"), dtype=int)
        for backend in ("torch", "openvino")
    )
    assert np.abs(torch_prob - openvino_prob).max() <= 1  # probability x 255, rounded: at most one level apart
    torch_mask, openvino_mask = (
        np.asarray(Image.open(tmp_path / backend / f"{photo.stem}_mask.png")) for backend in ("torch", "openvino")
    )
    assert (torch_mask != openvino_mask).mean() < 1e-4  # only pixels within ~1e-5 of the threshold may differ
