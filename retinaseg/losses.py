"""Losses on logits; each computes in float32 so autocast never degrades the sums."""

import torch
import torch.nn.functional as F
from torch import nn

SMOOTH = 1e-15  # the seed's smoothing constant


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The seed's dice loss: 1 - (2*sum(y*p) + s) / (sum(y) + sum(p) + s) over all flattened pixels."""
    probs = torch.sigmoid(logits.float()).reshape(-1)
    target = target.float().reshape(-1)
    intersection = (probs * target).sum()
    return 1 - (2 * intersection + SMOOTH) / (target.sum() + probs.sum() + SMOOTH)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return dice_loss(logits, target) + bce_loss(logits, target)


LOSSES = {"dice": dice_loss, "bce": bce_loss, "dice_bce": dice_bce_loss}


class SegmentationLoss(nn.Module):
    """Picks a loss by name (`model.loss` in the config)."""

    def __init__(self, name: str = "dice"):
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
        self.name = name
        self.fn = LOSSES[name]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.fn(logits, target)
