import numpy as np
import pytest

from retinaseg.data.sources.synthetic import synthetic_samples


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples(4, seed=0)


def test_shapes_dtypes_and_ids(samples):
    assert [s.id for s in samples] == ["synthetic_000", "synthetic_001", "synthetic_002", "synthetic_003"]
    for s in samples:
        assert s.image.shape == (584, 565, 3) and s.image.dtype == np.uint8
        assert s.label.shape == (584, 565) and s.label.dtype == np.uint8
        assert s.fov.shape == (584, 565) and s.fov.dtype == bool
        assert set(np.unique(s.label)) <= {0, 1}


def test_custom_size():
    s = synthetic_samples(1, height=128, width=160)[0]
    assert s.image.shape == (128, 160, 3) and s.label.shape == s.fov.shape == (128, 160)


def test_deterministic_and_independent_of_n(samples):
    again = synthetic_samples(2, seed=0)
    for a, b in zip(samples, again):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.label, b.label)
        assert np.array_equal(a.fov, b.fov)


def test_different_seeds_and_indices_differ(samples):
    other = synthetic_samples(1, seed=1)[0]
    assert not np.array_equal(samples[0].image, other.image)
    assert not np.array_equal(samples[0].label, other.label)
    assert not np.array_equal(samples[0].image, samples[1].image)


def test_nothing_outside_fov(samples):
    for s in samples:
        assert not s.label[~s.fov].any()
        assert not s.image[~s.fov].any()


def test_fov_is_a_centred_disc(samples):
    fov = samples[0].fov
    assert 0.6 < fov.mean() < 0.85
    h, w = fov.shape
    assert fov[h // 2, w // 2] and not fov[0, 0] and not fov[-1, -1]
    # A centred disc: mirror-symmetric both ways, and every row inside it is one contiguous run.
    assert np.array_equal(fov, fov[::-1]) and np.array_equal(fov, fov[:, ::-1])
    for row in fov[fov.any(axis=1)]:
        idx = np.flatnonzero(row)
        assert idx[-1] - idx[0] + 1 == len(idx)


def test_vessel_fraction_realistic(samples):
    for s in samples:
        assert 0.05 < s.label[s.fov].mean() < 0.2


def test_vessels_darker_in_green(samples):
    for s in samples:
        green = s.image[..., 1].astype(float)
        vessel, background = green[(s.label == 1) & s.fov], green[(s.label == 0) & s.fov]
        assert vessel.mean() < background.mean() - 10
