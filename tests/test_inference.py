import pytest
import torch
from torch import nn

from retinaseg.core.errors import ConfigError
from retinaseg.inference.settings import InferenceSettings
from retinaseg.inference.windows import predict_probabilities, sliding_window_inference
from retinaseg.model.unet import UNet


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """(1, 2, H, W) image whose channels are each pixel's row and column, so a predictor can tell where a crop is."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows, cols]).float().unsqueeze(0)


@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("size", [(37, 53), (16, 16), (64, 33)])
def test_identity_predictor_reproduces_input(weighting, overlap, size):
    images = torch.randn(1, 3, *size)
    out = sliding_window_inference(images, lambda x: x, 16, overlap=overlap, weighting=weighting)
    assert out.shape == images.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, images)


def test_rectangular_window_and_tiny_sigma():
    # sigma_scale so small that the raw Gaussian underflows to 0 off-centre: the clamp must keep borders finite.
    images = torch.randn(2, 1, 29, 41)
    out = sliding_window_inference(images, lambda x: x, (8, 12), overlap=0.5, weighting="gaussian", sigma_scale=0.01)
    torch.testing.assert_close(out, images)


def test_windows_cover_every_pixel_and_end_at_the_border():
    seen = torch.zeros(37, 53, dtype=torch.int64)
    starts = set()

    def record(crops):
        assert crops.shape[-2:] == (16, 16)  # no window sticks out of the image
        for rows, cols in crops.long():
            seen[rows, cols] += 1
            starts.add((rows.min().item(), cols.min().item()))
        return crops

    sliding_window_inference(coordinate_image(37, 53), record, 16, overlap=0.25)
    assert (seen > 0).all()
    # stride round(16 * 0.75) = 12; the last window is flush with the bottom/right border.
    assert {y for y, _ in starts} == {0, 12, 21}
    assert {x for _, x in starts} == {0, 12, 24, 36, 37}


def test_stride_is_at_least_one():
    calls = []
    sliding_window_inference(torch.randn(1, 1, 4, 3), lambda x: calls.append(len(x)) or x, 2, overlap=0.99)
    assert sum(calls) == 3 * 2  # stride 1: 3 row starts x 2 column starts


def test_image_smaller_than_window_is_padded_and_cropped_back():
    images = torch.randn(2, 3, 5, 7)
    shapes = []
    out = sliding_window_inference(images, lambda x: shapes.append(x.shape) or x * 2, 16)
    assert shapes == [(2, 3, 16, 16)]
    torch.testing.assert_close(out, images * 2)


@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
def test_per_window_constant_blends_by_weights(weighting):
    # Width 24, window 16, overlap 0.5: windows start at columns 0 and 8; each returns its start column everywhere.
    def window_start(crops):
        return crops[:, 1:].amin(dim=(-2, -1), keepdim=True).expand(-1, 1, 16, 16)

    out = sliding_window_inference(coordinate_image(16, 24), window_start, 16, overlap=0.5, weighting=weighting)
    # The window's centre row; off-centre rows differ for "gaussian" where the weight floor evens out both windows.
    row = out[0, 0, 7]
    assert (row[:8] == 0).all() and (row[16:] == 8).all()  # covered by one window only
    middle = row[8:16]
    if weighting == "constant":
        torch.testing.assert_close(out[0, 0, :, 8:16], torch.full((16, 8), 4.0))
    else:
        # Each pixel leans towards the window whose centre it is nearer to, symmetrically.
        assert middle[0] < 1 and middle[-1] > 7
        assert (middle.diff() >= 0).all()
        torch.testing.assert_close(middle + middle.flip(0), torch.full((8,), 8.0))


@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
@pytest.mark.parametrize("size", [(37, 53), (9, 12)])
def test_pointwise_conv_matches_whole_image(weighting, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=1)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = sliding_window_inference(images, conv, 16, overlap=0.25, batch_size=3, weighting=weighting)
        expected = conv(images)
    assert out.shape == (2, 4, *size)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
def test_batch_size_changes_nothing(weighting):
    images = torch.randn(3, 2, 37, 53)
    results = [
        sliding_window_inference(images, lambda x: x.sin() * 3, 16, batch_size=b, weighting=weighting)
        for b in (1, 5, 16, 1000)
    ]
    for out in results[1:]:
        assert torch.equal(out, results[0])


def test_images_are_independent_when_batched_together():
    images = torch.randn(3, 2, 20, 30)
    batch_sizes = []

    def predictor(x):
        batch_sizes.append(len(x))
        return x.tanh()

    out = sliding_window_inference(images, predictor, 16, batch_size=5, weighting="gaussian")
    assert batch_sizes == [5, 5, 5, 3]  # 6 windows per image, so batches straddle images
    for n in range(3):
        alone = sliding_window_inference(images[n : n + 1], torch.tanh, 16, weighting="gaussian")
        torch.testing.assert_close(out[n : n + 1], alone)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_predictor_still_returns_float32(dtype):
    images = torch.rand(2, 1, 37, 53)
    out = sliding_window_inference(images, lambda x: x.to(dtype), 16, weighting="gaussian")
    assert out.dtype == torch.float32 and out.device == images.device
    torch.testing.assert_close(out, images, atol=1e-2, rtol=1e-2)


def test_gradients_flow_when_caller_allows_them():
    conv = nn.Conv2d(1, 1, kernel_size=1)
    sliding_window_inference(torch.randn(1, 1, 20, 20), conv, 16).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        (torch.zeros(3, 8, 8), {}, "4-D"),
        (torch.zeros(1, 1, 8, 8), {"window": 0}, "window"),
        (torch.zeros(1, 1, 8, 8), {"window": (4, 0)}, "window"),
        (torch.zeros(1, 1, 8, 8), {"window": (4, 4, 4)}, "window"),
        (torch.zeros(1, 1, 8, 8), {"overlap": 1.0}, "overlap"),
        (torch.zeros(1, 1, 8, 8), {"overlap": -0.1}, "overlap"),
        (torch.zeros(1, 1, 8, 8), {"batch_size": 0}, "batch_size"),
        (torch.zeros(1, 1, 8, 8), {"weighting": "cosine"}, "weighting"),
        (torch.zeros(1, 1, 8, 8), {"weighting": "gaussian", "sigma_scale": 0.0}, "sigma_scale"),
    ],
)
def test_bad_arguments_raise(images, kwargs, message):
    kwargs = {"window": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        sliding_window_inference(images, lambda x: x, **kwargs)


def test_predictor_with_wrong_output_shape_raises():
    with pytest.raises(ValueError, match="predictor"):
        sliding_window_inference(torch.zeros(1, 1, 8, 8), lambda x: x[..., :2, :], 4)


@pytest.fixture
def conv_model():
    torch.manual_seed(0)
    return nn.Conv2d(3, 1, kernel_size=3, padding=1)


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_predict_probabilities_shape_range_and_no_graph(conv_model, mode):
    images = torch.randn(3, 3, 37, 53)
    probs = predict_probabilities(conv_model, images, InferenceSettings(mode=mode, window=16, batch_size=2))
    assert probs.shape == (3, 1, 37, 53) and probs.dtype == torch.float32
    assert probs.min() >= 0 and probs.max() <= 1
    assert not probs.requires_grad


def test_predict_probabilities_whole_is_sigmoid_of_model(conv_model):
    images = torch.randn(5, 3, 21, 30)
    with torch.no_grad():
        expected = conv_model(images).sigmoid()
    torch.testing.assert_close(predict_probabilities(conv_model, images, InferenceSettings(batch_size=2)), expected)


def test_predict_probabilities_sliding_with_window_covering_image_matches_whole(conv_model):
    # Zero padding up to the window matches the conv's own zero padding, so one window reproduces "whole".
    images = torch.randn(2, 3, 21, 30)
    whole = predict_probabilities(conv_model, images)
    sliding = predict_probabilities(conv_model, images, InferenceSettings(mode="sliding", window=32))
    torch.testing.assert_close(sliding, whole)


def test_predict_probabilities_autocast_bf16(conv_model):
    images = torch.randn(2, 3, 21, 30)
    reference = predict_probabilities(conv_model, images)
    for mode in ("whole", "sliding"):
        probs = predict_probabilities(
            conv_model, images, InferenceSettings(mode=mode, window=16), autocast_dtype=torch.bfloat16
        )
        assert probs.dtype == torch.float32
        if mode == "whole":
            torch.testing.assert_close(probs, reference, atol=2e-2, rtol=0)


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_predict_probabilities_unet_any_size(mode):
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2).eval()
    probs = predict_probabilities(model, torch.randn(2, 3, 19, 27), InferenceSettings(mode=mode, window=16))
    assert probs.shape == (2, 1, 19, 27)
    assert torch.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1
    assert not model.training  # left as the caller set it


def test_predict_probabilities_unknown_mode_raises(conv_model):
    # The settings are checked once, where they are made; predict_probabilities takes them checked.
    with pytest.raises(ConfigError, match="mode"):
        predict_probabilities(conv_model, torch.randn(1, 3, 8, 8), InferenceSettings.of({"mode": "tiled"}, "inference"))
