"""Losses on logits; each computes in float32 so autocast never degrades the sums."""

import functools

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


# Soft skeletons (Shit et al., "clDice - a novel topology-preserving loss function for tubular structure
# segmentation", CVPR 2021): min- and max-pooling as differentiable erosion and dilation. Iterations: each thins by
# a pixel a side, so 10 reach the middle of DRIVE's widest vessels (~12 px) in the model's 64 px patches.
SKELETON_ITERATIONS = 10
CLDICE_SMOOTH = 1.0  # the paper's code's


def soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Minimum over the 4-neighbourhood (a cross: the paper's erosion), per pixel of (N, C, H, W)."""
    negated = -x  # min(-max(-x), -max(-x)) is -max(max(-x), max(-x)): one negation each way instead of two
    return -torch.maximum(F.max_pool2d(negated, (3, 1), 1, (1, 0)), F.max_pool2d(negated, (1, 3), 1, (0, 1)))


def soft_dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 1, 1)


def soft_skeleton(x: torch.Tensor, iterations: int = SKELETON_ITERATIONS) -> torch.Tensor:
    """The soft skeleton of probabilities (N, C, H, W): what each erosion removes that an opening does not restore."""
    # Pooling works plane by plane, so the N x C planes can be the channels of one channels-last image: torch's CPU
    # kernel then runs across them in vector lanes. One single-channel plane at a time, each pooling took 9 times
    # as long and the clDice term of a drive_cpu step (32 patches of 64 px) twice as long. The values are the same.
    shape = x.shape
    x = x.reshape(1, -1, *shape[-2:]).contiguous(memory_format=torch.channels_last)
    # The paper's loop erodes each image twice: once for the next iteration and once inside the opening
    # dilate(erode(x)). Both are the same erosion, so it is computed once and kept: 3 poolings an iteration instead
    # of 5, the same values and gradients, and a drive_cpu step with the clDice term 1.12 times as fast on a CPU.
    eroded = soft_erode(x)
    skeleton = F.relu(x - soft_dilate(eroded))
    for _ in range(iterations):
        x = eroded
        eroded = soft_erode(x)
        delta = F.relu(x - soft_dilate(eroded))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton.contiguous().reshape(shape)


def cldice_loss(logits: torch.Tensor, target: torch.Tensor, iterations: int = SKELETON_ITERATIONS) -> torch.Tensor:
    """1 - soft clDice: the harmonic mean of the predicted skeleton's share inside the label (topology precision)
    and the label skeleton's share inside the prediction (topology sensitivity), over the batch; skeletons of
    `iterations`."""
    probs, target = torch.sigmoid(logits.float()), target.float()
    skeleton = soft_skeleton(probs, iterations)
    precision = ((skeleton * target).sum() + CLDICE_SMOOTH) / (skeleton.sum() + CLDICE_SMOOTH)
    label_skeleton = soft_skeleton(target, iterations)
    sensitivity = ((label_skeleton * probs).sum() + CLDICE_SMOOTH) / (label_skeleton.sum() + CLDICE_SMOOTH)
    return 1 - 2 * precision * sensitivity / (precision + sensitivity)


def dice_bce_cldice_loss(
    logits: torch.Tensor, target: torch.Tensor, cldice_weight: float = 0.5, iterations: int = SKELETON_ITERATIONS
) -> torch.Tensor:
    return dice_bce_loss(logits, target) + cldice_weight * cldice_loss(logits, target, iterations)


LOSSES = {"dice": dice_loss, "bce": bce_loss, "dice_bce": dice_bce_loss, "dice_bce_cldice": dice_bce_cldice_loss}


class SegmentationLoss(nn.Module):
    """Picks a loss by name (`model.loss` in the config); `cldice_weight` weighs dice_bce_cldice's clDice term, whose
    soft skeletons take `cldice_iterations`."""

    def __init__(self, name: str = "dice", cldice_weight: float = 0.5, cldice_iterations: int = SKELETON_ITERATIONS):
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
        self.name = name
        self.fn = (
            functools.partial(dice_bce_cldice_loss, cldice_weight=cldice_weight, iterations=cldice_iterations)
            if name == "dice_bce_cldice"
            else LOSSES[name]
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.fn(logits, target)
