"""Speed options compose and run: bf16 autocast on CPU, channels_last, torch.compile."""

import time

import hydra
import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters

from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.core.errors import ConfigError
from retinaseg.core.machine import compile_gains, fastest_precision
from retinaseg.model.checkpoint import load_checkpoint
from retinaseg.model.module import VesselSegmentationModule
from retinaseg.runs import budget
from retinaseg.runs.budget import timing_trainer
from retinaseg.train import train


@pytest.mark.slow
def test_bf16_mixed_training_on_cpu_keeps_the_loss_in_float32(tmp_path):
    cfg = compose_config(
        "train", TINY_SYNTHETIC + ["trainer.precision=bf16-mixed", "debug=fast", "model.channels_last=false"], tmp_path
    )
    assert 0.0 <= train(cfg) <= 1.0
    module = VesselSegmentationModule(base_channels=4, depth=2)
    batch = {
        "image": torch.rand(2, 3, 32, 32),
        "label": (torch.rand(2, 1, 32, 32) > 0.8).float(),
        "fov": torch.ones(2, 1, 32, 32, dtype=torch.bool),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = module(batch["image"])
        loss = module.loss(logits, batch["label"])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_channels_last_changes_layout_not_results():
    torch.manual_seed(0)
    plain = VesselSegmentationModule(base_channels=4, depth=2, channels_last=False).eval()
    fast = VesselSegmentationModule(base_channels=4, depth=2, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.net.e1.conv_block.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


def graphs_compiled() -> int:
    """The graphs torch.compile has captured in this process so far."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_probabilities_equal_eager_ones_within_bf16_tolerance():
    torch.manual_seed(0)
    eager = VesselSegmentationModule(base_channels=2, depth=1).eval()
    compiled = VesselSegmentationModule(base_channels=2, depth=1, compile=True).eval()
    compiled.load_state_dict(eager.state_dict())
    before = graphs_compiled()
    compiled.configure_model()  # as every trainer.fit/validate/test calls it
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = eager.predictor.probabilities(x), compiled.predictor.probabilities(x)
    assert graphs_compiled() > before
    # bf16 keeps 8 bits of mantissa: probabilities agree to about 1/256.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-2)


@pytest.mark.slow
def test_a_checkpoint_of_a_compiled_run_loads_into_an_eager_model(tmp_path):
    cfg = compose_config("train", TINY_SYNTHETIC + ["debug=fast", "model.compile=true"], tmp_path)
    before = graphs_compiled()
    train(cfg)
    assert graphs_compiled() > before
    path = tmp_path / "checkpoints" / "last.ckpt"
    state_dict = torch.load(path, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state_dict)
    checkpoint = load_checkpoint(str(path))
    assert checkpoint.hyper_parameters["compile"] is True
    eager = VesselSegmentationModule(**{**checkpoint.hyper_parameters, "compile": False})
    eager.load_state_dict(state_dict)  # strict: every key fits the eager model
    torch.testing.assert_close(checkpoint.build_module().state_dict(), eager.state_dict())


@pytest.mark.slow
def test_the_budget_calibration_times_the_compiled_model(tmp_path, monkeypatch):
    cfg = compose_config("train", TINY_SYNTHETIC, tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    trainers = []
    monkeypatch.setattr(
        budget, "timing_trainer", lambda *args, **kw: trainers.append(timing_trainer(*args, **kw)) or trainers[-1]
    )
    # A size no other test compiles, so that nothing compiled before is reused.
    model = VesselSegmentationModule(base_channels=3, depth=1, compile=True)
    before = graphs_compiled()
    calibration = budget.calibrate(model, datamodule, {"precision": "32-true"}, 0, False, time.perf_counter())
    # The calibration's copy of the model ran compiled (a deepcopy drops the compiled call), so its step time is
    # the compiled one and the compilation is in its elapsed seconds; a second, fresh copy measured the warm-up
    # that the run pays with the compiled code cached.
    assert graphs_compiled() > before
    assert len(trainers) == 2
    assert calibration.elapsed_s >= calibration.step_s > 0 and calibration.warmup_s >= 0


def test_compile_auto_compiles_on_cuda_only():
    assert compile_gains(torch.device("cuda")) and not compile_gains(torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.compile must be one of False, True, auto"):
        VesselSegmentationModule(compile="yes")


def test_default_precision_is_a_valid_lightning_setting():
    assert fastest_precision() in ("bf16-mixed", "16-mixed", "32-true")
    L.Trainer(precision=fastest_precision(), logger=False, enable_checkpointing=False)
