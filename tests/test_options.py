"""Speed options compose and run: bf16 autocast on CPU, channels_last, torch.compile."""

import lightning as L
import pytest
import torch

from helpers import TINY_SYNTHETIC, compose_config
from retinaseg.module import VesselSegmentationModule
from retinaseg.precision import fastest_precision
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


@pytest.mark.slow
def test_compile_keeps_state_dict_keys_and_outputs():
    torch.manual_seed(0)
    eager = VesselSegmentationModule(base_channels=2, depth=1, channels_last=False).eval()
    compiled = VesselSegmentationModule(base_channels=2, depth=1, channels_last=False, compile=True).eval()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def test_default_precision_is_a_valid_lightning_setting():
    assert fastest_precision() in ("bf16-mixed", "16-mixed", "32-true")
    L.Trainer(precision=fastest_precision(), logger=False, enable_checkpointing=False)
