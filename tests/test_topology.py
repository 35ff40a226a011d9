"""Vessel topology (clDice, Betti-0) against hand-built masks whose answers are worked out by hand, and the per-image
counts every pooled metric is recomputed from."""

import numpy as np
import pytest
import torch
from skimage.morphology import skeletonize
from sklearn.metrics import roc_auc_score

from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.evaluation.counts import HEADLINE, REPORTED, Histograms, histogram_edges
from retinaseg.evaluation.scoring import ImageCounts, count_images
from retinaseg.model.metrics import FOVMetrics, reported


def topology(prediction: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """The topology metrics of one prediction against its label, everything inside the FOV."""
    fov = np.ones_like(label, dtype=bool)
    counts = count_images(
        ["x"], [prediction.astype(float)], [label.astype(np.uint8)], [fov], 0.5, with_histograms=False
    )
    return {
        **counts.total(),
        "components": int(counts.topology.components[0]),
        "label": int(counts.topology.label_components[0]),
    }


def cldice(precision: float, sensitivity: float) -> float:
    return 2 * precision * sensitivity / (precision + sensitivity)


def line() -> np.ndarray:
    """A one-pixel-wide vessel of 20 pixels: its own skeleton."""
    mask = np.zeros((11, 24), bool)
    mask[5, 2:22] = True
    return mask


def ring() -> np.ndarray:
    """A closed one-pixel-wide loop of 20 pixels (an octagon: square corners would be thinned away)."""
    mask = np.zeros((9, 9), bool)
    mask[1, 2:7] = mask[7, 2:7] = mask[2:7, 1] = mask[2:7, 7] = True
    return mask


def tee() -> np.ndarray:
    """A T-junction: a bar of 9 pixels and a stem of 6 below its middle, 15 pixels."""
    mask = np.zeros((9, 11), bool)
    mask[1, 1:10] = True
    mask[2:8, 5] = True
    return mask


def test_the_hand_built_masks_are_their_own_skeletons():
    # What the known answers below rest on: a one-pixel-wide vessel is its own skeleton.
    for mask in (line(), ring(), tee()):
        assert np.array_equal(skeletonize(mask), mask)


def test_a_broken_line():
    label, prediction = line(), line()
    prediction[5, 10:14] = False  # a 4-pixel gap: two pieces of 8
    values = topology(prediction, label)
    # skeleton(P) = P lies in the label; skeleton(L) = L has 16 of its 20 pixels in P.
    assert values["topology_precision"] == 1 and values["topology_sensitivity"] == pytest.approx(16 / 20)
    assert values["cldice"] == pytest.approx(cldice(1, 0.8))
    assert (values["components"], values["label"], values["betti0_error"]) == (2, 1, 1)


def test_a_ring_cut_once_is_still_one_component_but_loses_cldice():
    label, once, twice = ring(), ring(), ring()
    once[1, 4] = False
    twice[1, 4] = twice[7, 4] = False
    values = topology(once, label)
    assert (values["components"], values["label"], values["betti0_error"]) == (1, 1, 0)
    assert values["topology_precision"] == 1 and values["topology_sensitivity"] == pytest.approx(19 / 20)
    assert values["cldice"] == pytest.approx(cldice(1, 19 / 20))
    values = topology(twice, label)
    assert (values["components"], values["betti0_error"]) == (2, 1)
    assert values["cldice"] == pytest.approx(cldice(1, 18 / 20))


def test_a_t_junction_with_its_stem_cut_off_and_a_spurious_pixel():
    label, detached, spurious = tee(), tee(), tee()
    detached[2, 5] = False  # the stem no longer touches the bar
    values = topology(detached, label)
    assert (values["components"], values["label"], values["betti0_error"]) == (2, 1, 1)
    assert values["topology_precision"] == 1 and values["topology_sensitivity"] == pytest.approx(14 / 15)
    spurious[7, 9] = True  # an isolated false vessel pixel
    values = topology(spurious, label)
    assert (values["components"], values["betti0_error"]) == (2, 1)
    assert values["topology_precision"] == pytest.approx(15 / 16) and values["topology_sensitivity"] == 1
    assert values["cldice"] == pytest.approx(cldice(15 / 16, 1))


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    assert topology(mask, mask)["components"] == 1


def test_cldice_is_one_for_the_label_itself_and_for_its_centreline():
    sample = synthetic_samples(1, height=96, width=96)[0]
    label = sample.label.astype(bool)
    values = topology(label, label)
    assert values["cldice"] == values["topology_precision"] == values["topology_sensitivity"] == 1
    assert values["betti0_error"] == 0 and values["f1"] == 1
    # The centreline of a thick vessel is topologically perfect (clDice 1) though it misses most pixels (F1 low).
    thick = np.zeros((21, 40), bool)
    thick[6:15, 3:37] = True
    centreline = skeletonize(thick)
    values = topology(centreline, thick)
    assert values["cldice"] == 1 and values["f1"] < 0.3


def test_pixels_outside_the_fov_do_not_count():
    label = tee()
    fov = np.ones_like(label)
    fov[:, 9:] = False
    prediction = label.copy()
    prediction[5:8, 9:] = True  # a false vessel outside the FOV
    counts = count_images(
        ["x"], [prediction.astype(float)], [label.astype(np.uint8)], [fov], 0.5, with_histograms=False
    )
    assert counts.total()["cldice"] == 1 and counts.total()["betti0_error"] == 0
    assert counts.confusion.fp[0] == 0 and counts.confusion.tp[0] + counts.confusion.fn[0] == (label & fov).sum()


def samples_and_probabilities(n: int, seed: int = 0):
    """Synthetic images with probabilities that look like a trained model's: most pixels near 0 or 1."""
    rng = np.random.default_rng(seed)
    samples = synthetic_samples(n, height=64, width=64)
    probs = []
    for s in samples:
        score = np.where(s.label > 0, rng.normal(2.5, 2.0, s.label.shape), rng.normal(-4.0, 2.0, s.label.shape))
        probs.append((1 / (1 + np.exp(-score))).astype(np.float32))
    return samples, probs


def counts_of(samples, probs, threshold=0.5) -> ImageCounts:
    return count_images(
        [s.id for s in samples],
        probs,
        [s.label for s in samples],
        [s.fov for s in samples],
        threshold,
        with_histograms=True,
    )


def test_pixel_metrics_from_counts_equal_torchmetrics():
    samples, probs = samples_and_probabilities(3)
    counts = counts_of(samples, probs, threshold=0.4)
    metrics = FOVMetrics(0.4, with_auc=False)
    for s, p in zip(samples, probs):
        metrics.update(torch.from_numpy(p), torch.from_numpy(s.label), torch.from_numpy(s.fov))
    expected = reported({"auc": float("nan"), **metrics.compute()})
    total = counts.total()
    assert {key: total[key] for key in REPORTED if key != "auc"} == pytest.approx(
        {key: expected[key] for key in REPORTED if key != "auc"}, abs=1e-6
    )
    per_image = counts.per_image()
    assert per_image["f1"][1] == pytest.approx(counts_of(samples[1:2], probs[1:2], 0.4).total()["f1"])


def test_auc_from_histograms_is_within_its_bound_and_1e4_of_the_exact_auc():
    samples, probs = samples_and_probabilities(8)
    counts = counts_of(samples, probs)
    p = np.concatenate([q[s.fov] for s, q in zip(samples, probs)])
    y = np.concatenate([s.label[s.fov] for s in samples])
    exact = roc_auc_score(y, p)
    positive, negative = counts.histograms.positive.sum(0), counts.histograms.negative.sum(0)
    bound = (positive * negative).sum() / (2 * positive.sum() * negative.sum())
    assert abs(counts.total()["auc"] - exact) <= bound < 1e-4
    # The pairwise form used for resamples equals the AUC of the resampled images' pooled histograms.
    weights = np.array([3, 0, 1, 0, 2, 1, 1, 0], dtype=float)
    pooled = Histograms(
        (weights[:, None] * counts.histograms.positive).sum(0, keepdims=True),
        (weights[:, None] * counts.histograms.negative).sum(0, keepdims=True),
        counts.histograms.logit_range,
    )
    assert counts.pooled(weights)["auc"] == pytest.approx(float(pooled.pooled(np.ones(1))["auc"]), abs=1e-12)
    repeated = np.concatenate([np.repeat(q[s.fov], int(w)) for s, q, w in zip(samples, probs, weights)])
    labels = np.concatenate([np.repeat(s.label[s.fov], int(w)) for s, w in zip(samples, weights)])
    assert counts.pooled(weights)["auc"] == pytest.approx(roc_auc_score(labels, repeated), abs=1e-4)


def test_histogram_bins_cover_zero_and_one():
    edges = histogram_edges()
    assert edges[0] == 0 and edges[-1] == 1 and np.all(np.diff(edges) > 0) and len(edges) == 2**16 + 1
    probs = np.array([0.0, 1e-30, 0.5, 1 - 1e-7, 1.0], dtype=np.float32)
    histograms = Histograms.of([probs], [np.array([False, True, False, True, True])])
    assert histograms.positive.sum() == 3 and histograms.negative.sum() == 2
    assert histograms.negative[0, 0] == 1 and histograms.positive[0, -1] == 1


def test_counts_round_trip_through_columns_and_select():
    samples, probs = samples_and_probabilities(3)
    counts = counts_of(samples, probs)
    again = ImageCounts.from_columns(counts.ids, counts.columns(), counts.histograms)
    assert again.total() == counts.total()
    assert set(counts.total()) == set(HEADLINE)
    assert counts.select([2, 0]).ids == (counts.ids[2], counts.ids[0])
    both = ImageCounts.concatenate(counts, counts.select([2, 0]))
    assert both.per_image()["f1"][3] == pytest.approx(counts.per_image()["f1"][2])
