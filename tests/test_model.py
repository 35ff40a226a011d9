import pytest
import torch
import torch.nn as nn

from helpers.seed import seed_unet
from retinaseg.model.unet import UNet, rename_legacy_keys


def test_default_is_the_seed_network():
    model = UNet()
    assert sum(p.numel() for p in model.parameters()) == 31_043_521
    keys = list(model.state_dict())
    assert keys[0] == "e1.conv_block.conv1.weight"
    assert "d4.conv_block.bn2.bias" in keys and keys[-2:] == ["outputs.weight", "outputs.bias"]


def test_state_dict_keys_are_the_originals_in_its_order():
    assert list(UNet().state_dict()) == list(seed_unet().build_unet().state_dict())


def test_the_originals_weights_load_strictly_and_give_the_same_output():
    torch.manual_seed(0)
    original = seed_unet().build_unet()
    # Non-trivial BatchNorm statistics, so running stats are compared too.
    with torch.no_grad():
        for module in original.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    ours = UNet()
    ours.load_state_dict(original.state_dict(), strict=True)
    original.eval(), ours.eval()
    x = torch.rand(1, 3, 592, 592)  # the original's input: an RGB image in [0, 1], centre-cropped to 592
    with torch.no_grad():
        difference = (torch.sigmoid(ours(x)) - original(x)).abs().max()
    assert difference < 1e-5


@pytest.mark.parametrize("size", [(584, 565), (61, 47), (16, 16), (33, 100)])
def test_any_input_size_gives_the_same_output_size(size):
    model = UNet(base_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, 1, *size)


def test_scaled_down_model():
    small = UNet(base_channels=8, depth=3)
    assert not hasattr(small, "e4") and hasattr(small, "d3")
    assert sum(p.numel() for p in small.parameters()) < 500_000
    with torch.no_grad():
        assert small.eval()(torch.randn(1, 3, 40, 40)).shape == (1, 1, 40, 40)
    with pytest.raises(ValueError):
        UNet(depth=0)


def test_keys_of_checkpoints_from_before_up_conv_are_renamed():
    state = {f"net.{k.replace('up_conv', 'up')}": v for k, v in UNet(base_channels=4, depth=2).state_dict().items()}
    assert "net.d1.up.weight" in state
    assert rename_legacy_keys(state) == 4  # weight and bias of d1 and d2
    assert set(state) == {f"net.{k}" for k in UNet(base_channels=4, depth=2).state_dict()}
    assert rename_legacy_keys(state) == 0
