import pytest
import torch
import torch.nn as nn

from retinaseg.model import UNet


# A copy of the seed notebook's network, kept as written there (names included), to prove equivalence.
class conv_block(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_c)
        self.conv2 = nn.Conv2d(out_c, out_c, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_c)
        self.relu = nn.LeakyReLU()

    def forward(self, inputs):
        x = self.relu(self.bn1(self.conv1(inputs)))
        return self.relu(self.bn2(self.conv2(x)))


class encoder_block(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv_block = conv_block(in_c, out_c)
        self.pool = nn.MaxPool2d((2, 2))

    def forward(self, inputs):
        x = self.conv_block(inputs)
        return x, self.pool(x)


class decoder_block(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_c, out_c, kernel_size=2, stride=2, padding=0)
        self.conv_block = conv_block(out_c + out_c, out_c)

    def forward(self, inputs, skip):
        x = self.up(inputs)
        h, w = x.shape[2:]
        top, left = (skip.shape[2] - h) // 2, (skip.shape[3] - w) // 2
        skip = skip[:, :, top : top + h, left : left + w]
        return self.conv_block(torch.cat([x, skip], axis=1))


class build_unet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = encoder_block(3, 64)
        self.e2 = encoder_block(64, 128)
        self.e3 = encoder_block(128, 256)
        self.e4 = encoder_block(256, 512)
        self.b = conv_block(512, 1024)
        self.d1 = decoder_block(1024, 512)
        self.d2 = decoder_block(512, 256)
        self.d3 = decoder_block(256, 128)
        self.d4 = decoder_block(128, 64)
        self.outputs = nn.Conv2d(64, 1, kernel_size=1, padding=0)

    def forward(self, inputs):
        s1, p1 = self.e1(inputs)
        s2, p2 = self.e2(p1)
        s3, p3 = self.e3(p2)
        s4, p4 = self.e4(p3)
        b = self.b(p4)
        d1 = self.d1(b, s4)
        d2 = self.d2(d1, s3)
        d3 = self.d3(d2, s2)
        d4 = self.d4(d3, s1)
        return torch.sigmoid(self.outputs(d4))


def test_default_is_the_seed_network():
    model = UNet()
    assert sum(p.numel() for p in model.parameters()) == 31_043_521
    keys = list(model.state_dict())
    assert keys[0] == "e1.conv_block.conv1.weight"
    assert "d4.conv_block.bn2.bias" in keys and keys[-2:] == ["outputs.weight", "outputs.bias"]


def test_seed_weights_load_strictly_and_give_the_same_output():
    torch.manual_seed(0)
    seed = build_unet()
    # Non-trivial BatchNorm statistics, so running stats are compared too.
    with torch.no_grad():
        for module in seed.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    ours = UNet()
    assert set(ours.state_dict()) == set(seed.state_dict())
    ours.load_state_dict(seed.state_dict(), strict=True)
    seed.eval(), ours.eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(ours(x)), seed(x), rtol=1e-4, atol=1e-5)


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
