"""The seed project's U-Net, with its module names kept so original weights load unchanged."""

import re

import torch
import torch.nn.functional as F
from torch import nn

# Checkpoints written before the decoder's transposed conv took the original's name (`up_conv`) hold it as
# `d<i>.up.weight` / `d<i>.up.bias` (with any prefix, e.g. `net.` in a LightningModule's state_dict).
LEGACY_DECODER_KEY = re.compile(r"((?:^|\.)d\d+)\.up\.(weight|bias)$")


def rename_legacy_keys(state_dict: dict) -> int:
    """Rename, in place, the keys of a state_dict written before `up_conv` kept the original's name;
    return how many were renamed (0 for a current state_dict)."""
    old = [key for key in state_dict if LEGACY_DECODER_KEY.search(key)]
    for key in old:
        state_dict[LEGACY_DECODER_KEY.sub(r"\1.up_conv.\2", key)] = state_dict.pop(key)
    return len(old)


class ConvBlock(nn.Module):
    """Two rounds of conv3x3 -> BatchNorm -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(x)))


class EncoderBlock(nn.Module):
    """ConvBlock, then 2x2 max-pool; returns (skip, pooled)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_block = ConvBlock(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.conv_block(x)
        return skip, self.pool(skip)


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class DecoderBlock(nn.Module):
    """2x2 transposed conv up, concatenate the centre-cropped skip, ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # `up_conv`, as in the original, so its state_dict keys (`d1.up_conv.weight`, ...) are ours.
        self.up_conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv_block = ConvBlock(out_channels * 2, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up_conv(x)
        skip = center_crop(skip, x.shape[-2], x.shape[-1])
        return self.conv_block(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net returning logits of shape (N, out_channels, H, W) for any input size.

    With the defaults it is the seed's network (31,043,521 parameters) and its state_dict keys are the
    seed's (`e1.conv_block.conv1.weight` ... `b.conv1.weight` ... `d4.conv_block.bn2.bias`,
    `outputs.weight`). `base_channels` and `depth` scale it down for CPU work.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_channels: int = 64, depth: int = 4):
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError(f"depth and base_channels must be >= 1, got depth={depth}, base_channels={base_channels}")
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        for i in range(depth):
            setattr(self, f"e{i + 1}", EncoderBlock(in_channels if i == 0 else widths[i - 1], widths[i]))
        self.b = ConvBlock(widths[depth - 1], widths[depth])
        # Decoders are numbered from the bottleneck upwards, as in the seed (d1 is the deepest).
        for i in range(depth):
            setattr(self, f"d{i + 1}", DecoderBlock(widths[depth - i], widths[depth - i - 1]))
        self.outputs = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # Pad to a multiple of 2**depth so every pooling is exact, then crop back: any size in, same size out.
        # Always padded (by 0 where the size is a multiple already): no branch on the input's size, so an
        # export with dynamic height and width (retinaseg.export, OpenVINO) holds for every size.
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="replicate")
        skips = []
        for i in range(self.depth):
            skip, x = getattr(self, f"e{i + 1}")(x)
            skips.append(skip)
        x = self.b(x)
        for i in range(self.depth):
            x = getattr(self, f"d{i + 1}")(x, skips[-1 - i])
        return center_crop(self.outputs(x), height, width)
