import pytest
import torch
import torch.nn.functional as F

from retinaseg.model.losses import SegmentationLoss, cldice_loss, dice_loss, soft_skeleton
from retinaseg.model.metrics import FOVMetrics, reported


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


@pytest.mark.parametrize("name", ["dice", "bce", "dice_bce", "dice_bce_cldice"])
def test_losses_run_in_float32_under_autocast(name):
    loss = SegmentationLoss(name)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), target)
    assert value.dtype == torch.float32
    expected = {"dice": dice_loss(logits, target), "bce": F.binary_cross_entropy_with_logits(logits, target)}
    expected["dice_bce"] = expected["dice"] + expected["bce"]
    expected["dice_bce_cldice"] = expected["dice_bce"] + 0.5 * cldice_loss(logits, target)
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


def thick_line() -> torch.Tensor:
    """(1, 1, 32, 32): a 7-pixel-wide horizontal bar, 20 pixels long."""
    image = torch.zeros(1, 1, 32, 32)
    image[..., 12:19, 6:26] = 1.0
    return image


def paper_soft_skeleton(img, iterations):
    # Shit et al.'s soft skeleton as their code writes it (github.com/jocpae/clDice, 2D case): each iteration erodes
    # the image and opens the eroded image, eroding it a second time.
    def soft_erode(img):
        p1 = -F.max_pool2d(-img, (3, 1), (1, 1), (1, 0))
        p2 = -F.max_pool2d(-img, (1, 3), (1, 1), (0, 1))
        return torch.min(p1, p2)

    def soft_dilate(img):
        return F.max_pool2d(img, (3, 3), (1, 1), (1, 1))

    def soft_open(img):
        return soft_dilate(soft_erode(img))

    skel = F.relu(img - soft_open(img))
    for _ in range(iterations):
        img = soft_erode(img)
        delta = F.relu(img - soft_open(img))
        skel = skel + F.relu(delta - skel * delta)
    return skel


@pytest.mark.parametrize("iterations", [0, 1, 10])
def test_soft_skeleton_equals_the_papers_in_values_and_gradients(iterations):
    # soft_skeleton computes each erosion once and pools all planes as one channels-last image; neither may change
    # what the loss trains on.
    torch.manual_seed(0)
    logits = (torch.randn(4, 1, 24, 24) * 3).requires_grad_()
    ours = soft_skeleton(torch.sigmoid(logits), iterations)
    theirs = paper_soft_skeleton(torch.sigmoid(logits), iterations)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    weights = torch.rand_like(ours)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (theirs_grad,) = torch.autograd.grad((theirs * weights).sum(), logits)
    torch.testing.assert_close(ours_grad, theirs_grad)


def test_soft_skeleton_of_a_thick_line_is_thin():
    bar = thick_line()
    skeleton = soft_skeleton(bar)
    assert skeleton.max() == 1.0 and ((skeleton > 0) <= (bar > 0)).all()
    # One row thick along the bar's middle (the ends taper), far fewer pixels than the 140 of the bar.
    rows = (skeleton[0, 0] > 0.5).any(dim=1).nonzero().flatten().tolist()
    assert rows == [15] and 10 <= int((skeleton > 0.5).sum()) <= 20
    # k iterations (model.cldice_iterations) skeletonise vessels up to 2k + 1 pixels wide: 3 reach the middle of the
    # 7-pixel bar, 2 leave it no skeleton at all.
    assert torch.equal(soft_skeleton(bar, 3), skeleton) and float(soft_skeleton(bar, 2).max()) < 0.5


def test_cldice_loss_is_zero_for_a_perfect_prediction_and_differentiable():
    target = thick_line()
    assert float(cldice_loss((target * 2 - 1) * 50, target)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros_like(target, requires_grad=True)
    loss = SegmentationLoss("dice_bce_cldice", cldice_weight=0.5)(logits, target)
    loss.backward()
    assert loss > 0 and logits.grad.abs().sum() > 0
    # Missing the bar's middle (a broken vessel) costs clDice; missing as many pixels along its edge costs less.
    broken, thinned = target.clone(), target.clone()
    broken[..., 12:19, 15:17] = 0
    thinned[..., 12, 6:20] = 0
    assert float(cldice_loss((broken * 2 - 1) * 50, target)) > float(cldice_loss((thinned * 2 - 1) * 50, target))
    dice_bce = SegmentationLoss("dice_bce")(logits, target)
    torch.testing.assert_close(loss, dice_bce + 0.5 * cldice_loss(logits, target))
    shallow = SegmentationLoss("dice_bce_cldice", cldice_weight=0.5, cldice_iterations=1)(logits, target)
    torch.testing.assert_close(shallow, dice_bce + 0.5 * cldice_loss(logits, target, iterations=1))
    assert abs(float((shallow - loss).detach())) > 1e-3
