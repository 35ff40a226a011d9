"""Bootstrap intervals over images and the paired comparison: what they must do whatever the data, checked against
normal theory and against the exact permutation distribution."""

import itertools

import numpy as np
import pytest

from helpers.configs import compose_config
from retinaseg.compare import compare
from retinaseg.core.errors import ConfigError
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.eval import evaluate
from retinaseg.evaluation import stats
from retinaseg.evaluation.scoring import ImageCounts, count_images


def noisy_counts(n: int, seed: int) -> ImageCounts:
    """Counts of n synthetic images segmented with noise: images differ, as real ones do."""
    rng = np.random.default_rng(seed)
    samples = synthetic_samples(n, height=64, width=64)
    probs = []
    for s in samples:
        quality = rng.uniform(0.5, 3.0)  # how well this image is segmented
        score = np.where(s.label > 0, rng.normal(quality, 2.0, s.label.shape), rng.normal(-3.0, 2.0, s.label.shape))
        probs.append((1 / (1 + np.exp(-score))).astype(np.float32))
    return count_images(
        [s.id for s in samples], probs, [s.label for s in samples], [s.fov for s in samples], 0.5, with_histograms=True
    )


@pytest.fixture(scope="module")
def counts() -> ImageCounts:
    return noisy_counts(12, seed=3)


def test_intervals_contain_the_estimate_and_are_seeded(counts):
    intervals = stats.bootstrap_intervals(counts.pooled, 12, 2000, seed=0)
    total = counts.total()
    assert set(intervals) == set(total)
    for key, (low, high) in intervals.items():
        assert low <= total[key] <= high and low < high, key
    assert stats.bootstrap_intervals(counts.pooled, 12, 2000, seed=0) == intervals
    assert stats.bootstrap_intervals(counts.pooled, 12, 2000, seed=1) != intervals


def test_intervals_shrink_as_images_are_duplicated(counts):
    # The same images, each four times: the same pooled values, from four times the images.
    repeated = counts.select(np.repeat(np.arange(12), 4))
    assert repeated.total() == pytest.approx(counts.total())
    once = stats.bootstrap_intervals(counts.pooled, 12, 2000, seed=0)
    four = stats.bootstrap_intervals(repeated.pooled, 48, 2000, seed=0)
    for key in once:
        # about half as wide (1 / sqrt(4))
        assert 0.3 < (four[key][1] - four[key][0]) / (once[key][1] - once[key][0]) < 0.7, key


def test_bootstrap_of_a_mean_matches_normal_theory():
    values = np.random.default_rng(0).normal(10.0, 3.0, 40)

    def mean(weights):
        return {"mean": weights @ values / weights.sum(axis=-1)}

    low, high = stats.bootstrap_intervals(mean, 40, 20000, seed=0)["mean"]
    half_width = 1.96 * values.std() / np.sqrt(40)  # the plug-in standard error, as the bootstrap's
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.05)
    assert (high + low) / 2 == pytest.approx(values.mean(), abs=0.1 * half_width)


def test_an_evaluation_compared_with_itself_differs_by_nothing(counts):
    both = ImageCounts.concatenate(counts, counts)
    for key, difference in stats.paired_comparison(both.pooled, 12, 2000, seed=0).items():
        assert difference.difference == 0 and difference.ci == (0, 0) and difference.p_value == 1, key
        assert difference.a == difference.b == pytest.approx(counts.total()[key])


def test_a_consistent_improvement_is_significant_and_its_interval_excludes_zero():
    a = np.random.default_rng(1).normal(0.8, 0.05, 20)
    b = a + np.random.default_rng(2).normal(0.01, 0.002, 20)  # better on every image

    def mean(weights):
        return {"mean": weights @ np.concatenate([a, b]) / weights.sum(axis=-1)}

    (difference,) = stats.paired_comparison(mean, 20, 2000, seed=0).values()
    assert difference.difference == pytest.approx(np.mean(b - a))
    assert 0 < difference.ci[0] < difference.difference < difference.ci[1]
    assert difference.p_value == pytest.approx(1 / 2001)  # no swap is as extreme
    # Without resamples: the values only.
    (plain,) = stats.paired_comparison(mean, 20, 0, seed=0).values()
    assert plain.difference == difference.difference and plain.ci is None and plain.p_value is None


def test_the_p_value_approximates_the_exact_permutation_test():
    # 8 images: all 2**8 swaps can be enumerated.
    rng = np.random.default_rng(4)
    a = rng.normal(0.0, 1.0, 8)
    b = a + rng.normal(0.4, 1.0, 8)

    def mean(weights):
        return {"mean": weights @ np.concatenate([a, b]) / weights.sum(axis=-1)}

    observed = abs(np.mean(b - a))
    swaps = np.array(list(itertools.product([1, -1], repeat=8)))
    exact = np.mean(np.abs((swaps * (b - a)).mean(axis=1)) >= observed - 1e-12)
    (difference,) = stats.paired_comparison(mean, 8, 20000, seed=0).values()
    assert 0.02 < exact < 0.5  # neither trivially significant nor trivially not
    assert difference.p_value == pytest.approx(exact, abs=0.01)


def test_too_few_resamples_for_a_95_interval_are_refused(tmp_path):
    assert stats.check_resamples("bootstrap", 0) == 0 and stats.check_resamples("bootstrap", 200) == 200
    for resamples in (1, 2, stats.MIN_RESAMPLES - 1):
        with pytest.raises(ConfigError, match=f"bootstrap={resamples} resamples are too few .* at least 200"):
            stats.check_resamples("bootstrap", resamples)
    # Both commands that print intervals check it before any work.
    with pytest.raises(ConfigError, match="bootstrap=2 resamples are too few"):
        evaluate(compose_config("eval", ["ckpt_path=missing.ckpt", "bootstrap=2"], tmp_path))
    with pytest.raises(ConfigError, match="bootstrap=1 resamples are too few"):
        compare(compose_config("compare", [f"a={tmp_path}", f"b={tmp_path}", "bootstrap=1"], tmp_path))
