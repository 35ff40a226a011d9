"""Splits (official, validation by image, k-fold), data.scale with scores at the original resolution, labels
read through luminance, the AUC of training's metrics in constant memory, and the counts cross-validation pools."""

import hydra
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from sklearn.metrics import f1_score, roc_auc_score

from helpers.checkpoints import write_checkpoint
from helpers.configs import TINY_SYNTHETIC, compose_config
from helpers.datasets import encode, make_drive
from retinaseg.core.errors import ConfigError, DataError
from retinaseg.data.datamodule import FundusDataModule, PatchDataset, WholeImageDataset
from retinaseg.data.preprocess import Preprocessing, read_mask, resize_mask
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.data.splits import kfold, validation
from retinaseg.evaluation.counts import HISTOGRAM_BINS
from retinaseg.evaluation.directory import EvaluationDirectory
from retinaseg.evaluation.scoring import ImageCounts, count_images
from retinaseg.model.checkpoint import load_checkpoint
from retinaseg.model.metrics import FOVMetrics
from retinaseg.model.module import VesselSegmentationModule


def test_drive_validation_images_are_those_checkpoints_recorded(tmp_path):
    """The validation images of data.split_seed=0, data.val_images=4 (threshold=val of every DRIVE checkpoint so far)."""
    ids = [f"{n}_training" for n in range(21, 41)]
    train, val = validation(ids, 4, 0)
    assert val == ["23_training", "25_training", "27_training", "40_training"] and train == [
        i for i in ids if i not in val
    ]


def test_kfold_tests_every_image_exactly_once():
    ids = [f"im{k}" for k in range(11)]
    tested = []
    for fold in range(3):
        train, test = kfold(ids, 3, fold, seed=5)
        assert not set(train) & set(test) and sorted(train + test) == sorted(ids) and len(test) in (3, 4)
        assert kfold(ids, 3, fold, seed=5) == (train, test)
        tested += test
    assert sorted(tested) == sorted(ids)
    assert kfold(ids, 11, 4, seed=0)[1] == [ids[np.random.default_rng(0).permutation(11)[4]]]  # leave-one-out
    with pytest.raises(ConfigError, match="data.folds=12 is more than the 11 labelled images of the dataset"):
        kfold(ids, 12, 0, 0)
    with pytest.raises(ConfigError, match=r"data.fold must be an integer in \[0, 2\]; got 3"):
        kfold(ids, 3, 3, 0)


def test_cross_validation_in_the_data_module_holds_validation_out_of_the_training_folds():
    settings = dict(dataset="synthetic", synthetic_images=3, synthetic_size=(64, 64), val_images=1, folds=2)
    parts = [
        {part: FundusDataModule(**settings, fold=f).ids(part) for part in ("train", "val", "test")} for f in (0, 1)
    ]
    every = FundusDataModule(**settings).ids("all")
    assert len(every) == 6 and sorted(parts[0]["test"] + parts[1]["test"]) == sorted(every)
    for p in parts:
        assert sorted(p["train"] + p["val"] + p["test"]) == sorted(every) and len(p["val"]) == 1


def test_official_split_without_test_images_says_so(tmp_path):
    dm = FundusDataModule(root=str(make_drive(tmp_path / "DRIVE")), val_images=1, patch_size=16)
    assert dm.ids("train") and dm.ids("val")
    with pytest.raises(DataError, match="test/images is missing"):
        dm.ids("test")


def test_scale_resizes_what_the_model_sees_and_scores_at_the_original_resolution():
    samples = synthetic_samples(2, seed=3, height=120, width=100)
    half = Preprocessing(scale=0.5)
    patches = PatchDataset(samples, 16, half, augment=False, length=4)
    assert patches.labels[0].shape == (60 + 2 * patches.pad, 50 + 2 * patches.pad)
    assert np.array_equal(
        patches.labels[0][patches.pad : -patches.pad, patches.pad : -patches.pad], resize_mask(samples[0].label, 0.5)
    )
    item = WholeImageDataset(samples, half)[0]
    assert item["image"].shape == (3, 60, 50) and item["label"].shape == item["fov"].shape == (1, 120, 100)
    # The module's validation and test probabilities come back at the label's resolution.
    module = VesselSegmentationModule(base_channels=4, depth=2).eval()
    batch = {key: value[None] if torch.is_tensor(value) else [value] for key, value in item.items()}
    with torch.no_grad():
        probs = module.validation_step(batch, 0)["probs"]
        expected = module.predictor.probabilities(batch["image"], (120, 100))
    assert probs.shape == (1, 1, 120, 100) and torch.equal(probs, expected)
    with pytest.raises(ConfigError, match="data.scale must be a number > 0; got 0"):
        Preprocessing(scale=0)


def test_nearly_binary_labels_are_thresholded_and_others_refused():
    label = np.zeros((40, 40), np.uint8)
    label[10:20] = 255
    fringe = label.copy()
    fringe[20, :5] = [3, 130, 200, 60, 250]  # a few compression artefacts at an edge
    assert np.array_equal(
        read_mask(encode(fringe, ".png"), "fringe.png", "photo.png", fringe.shape), (fringe >= 128).astype(np.uint8)
    )
    gray = np.tile(np.arange(0, 240, 6, dtype=np.uint8), (40, 1))
    with pytest.raises(DataError, match=r"gray.png is not a binary mask: it holds 40 values"):
        read_mask(encode(gray, ".png"), "gray.png", "photo.png", gray.shape)


def test_fov_metrics_auc_from_histograms_is_the_exact_auc_within_1e4_in_constant_memory():
    rng = np.random.default_rng(0)
    label = rng.random(40_000) < 0.2
    prob = 1 / (1 + np.exp(-(label * 3 + rng.normal(0, 2, label.size))))  # a confident model: tails near 0 and 1
    metrics = FOVMetrics(0.5)
    for part in np.array_split(np.arange(label.size), 4):
        metrics.update(torch.from_numpy(prob[part].astype(np.float32)), torch.from_numpy(label[part].astype(np.uint8)))
    assert float(metrics.compute()["auc"]) == pytest.approx(roc_auc_score(label, prob.astype(np.float32)), abs=1e-4)
    assert metrics["auc"].positive.numel() == metrics["auc"].negative.numel() == HISTOGRAM_BINS


def test_image_counts_saved_and_loaded_pool_like_their_pixels(tmp_path):
    """What a cross-validation fold leaves (per_image.csv, histograms.npz) pools with the other folds' as the pixels would."""
    rng = np.random.default_rng(1)
    folds = []
    for fold, n in enumerate((2, 3)):
        labels = [rng.random((20, 20)) < 0.2 for _ in range(n)]
        probs = [np.clip(t * 0.4 + rng.random((20, 20)) * 0.7, 0, 1).astype(np.float32) for t in labels]
        fovs = [rng.random((20, 20)) < 0.9 for _ in range(n)]
        counts = count_images([f"{fold}_{i}" for i in range(n)], probs, labels, fovs, 0.5, with_histograms=True)
        EvaluationDirectory(tmp_path / str(fold)).write_counts(counts)
        folds.append((probs, labels, fovs))
    pooled = ImageCounts.concatenate(
        *(EvaluationDirectory(tmp_path / str(fold)).read_counts("fold") for fold in (0, 1))
    ).total()
    p = np.concatenate([prob[fov] for probs, _, fovs in folds for prob, fov in zip(probs, fovs)])
    y = np.concatenate([label[fov] for _, labels, fovs in folds for label, fov in zip(labels, fovs)])
    assert pooled["f1"] == pytest.approx(f1_score(y, p > 0.5), abs=1e-9)
    assert pooled["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)


def test_a_fold_without_folds_is_refused_and_old_checkpoints_still_load(tmp_path):
    with pytest.raises(ConfigError, match=r"data.fold=1 is set without data.folds.*Set data.folds too"):
        FundusDataModule(dataset="synthetic", fold=1)
    cfg = compose_config("train", TINY_SYNTHETIC + ["data.fold=0"], tmp_path)
    with pytest.raises(InstantiationException, match="data.fold=0 is set without data.folds"):
        hydra.utils.instantiate(cfg.data)
    # data.folds alone tests fold 0.
    settings = dict(dataset="synthetic", synthetic_images=3, synthetic_size=(64, 64), val_images=1, folds=2)
    assert FundusDataModule(**settings).ids("test") == FundusDataModule(**settings, fold=0).ids("test")
    # Checkpoints written when data.fold was 0 by default record it without data.folds.
    path = write_checkpoint(tmp_path / "old.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path))
    content = torch.load(path, weights_only=True)
    content["datamodule_hyper_parameters"]["fold"] = 0
    torch.save(content, path)
    assert FundusDataModule(**load_checkpoint(path).data).ids("test")


def test_a_scale_that_leaves_too_few_pixels_is_refused():
    image = synthetic_samples(1, height=584, width=565)[0].image
    assert Preprocessing(scale=32 / 565).image(image).shape == (33, 32, 3)
    with pytest.raises(ConfigError, match=r"scale 1e-09 makes a 584x565 image 1x1 pixels, under the 32 a side"):
        Preprocessing(scale=1e-9).image(image)
