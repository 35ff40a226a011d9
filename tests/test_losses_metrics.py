import pytest
import torch
import torch.nn.functional as F

from retinaseg.losses import SegmentationLoss, dice_loss
from retinaseg.metrics import FOVMetrics, reported


def seed_dice_loss(inputs, targets, smooth=1e-15):
    # The seed's DiceLoss.forward, applied to probabilities.
    inputs = inputs.view(-1)
    targets = targets.view(-1)
    intersection = (inputs * targets).sum()
    dice = (2.0 * intersection + smooth) / (inputs.sum() + targets.sum() + smooth)
    return 1 - dice


def test_dice_loss_equals_the_seed_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 16, 16)
    target = (torch.rand(3, 1, 16, 16) > 0.8).float()
    torch.testing.assert_close(dice_loss(logits, target), seed_dice_loss(torch.sigmoid(logits), target))
    assert float(dice_loss(torch.full((1, 1, 4, 4), 50.0), torch.ones(1, 1, 4, 4))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["dice", "bce", "dice_bce"])
def test_losses_run_in_float32_under_autocast(name):
    loss = SegmentationLoss(name)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), target)
    assert value.dtype == torch.float32
    expected = {"dice": dice_loss(logits, target), "bce": F.binary_cross_entropy_with_logits(logits, target)}
    expected["dice_bce"] = expected["dice"] + expected["bce"]
    torch.testing.assert_close(value, expected[name], rtol=2e-2, atol=1e-2)
    with pytest.raises(ValueError):
        SegmentationLoss("focal")


def test_metrics_ignore_pixels_outside_the_fov_and_pool_over_batches():
    torch.manual_seed(1)
    probs = torch.rand(4, 1, 10, 10)
    target = (torch.rand(4, 1, 10, 10) > 0.7).long()
    fov = torch.zeros(4, 1, 10, 10, dtype=torch.bool)
    fov[..., 2:8, 2:8] = True

    metrics = FOVMetrics()
    metrics.update(probs, target, fov)
    values = reported(metrics.compute())

    # Anything outside the FOV may change without changing a number.
    scrambled = torch.where(fov, probs, 1 - probs)
    other = FOVMetrics()
    for i in range(4):  # and batches are pooled, not averaged
        other.update(scrambled[i : i + 1], torch.where(fov, target, 1 - target)[i : i + 1], fov[i : i + 1])
    assert reported(other.compute()) == pytest.approx(values)

    pred, truth = probs[fov] >= 0.5, target[fov].bool()
    tp, fp = (pred & truth).sum().item(), (pred & ~truth).sum().item()
    fn, tn = (~pred & truth).sum().item(), (~pred & ~truth).sum().item()
    assert values["recall"] == pytest.approx(tp / (tp + fn))
    assert values["sensitivity"] == values["recall"]
    assert values["precision"] == pytest.approx(tp / (tp + fp))
    assert values["specificity"] == pytest.approx(tn / (tn + fp))
    assert values["accuracy"] == pytest.approx((tp + tn) / (tp + tn + fp + fn))
    assert values["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert values["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert 0 < values["auc"] < 1
