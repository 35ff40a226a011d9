import zipfile

import numpy as np
import pytest
import torch

from helpers.datasets import link_drive, read_split
from retinaseg.core.errors import ConfigError, DataError
from retinaseg.data.datamodule import EpochSampler, FundusDataModule, PatchDataset
from retinaseg.data.preprocess import Preprocessing, equalize_contrast
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.model.module import VesselSegmentationModule


@pytest.fixture(scope="module")
def drive_test(drive_root):
    return read_split("drive", drive_root, "test")


def test_drive_test_split_has_the_original_vessel_counts(drive_test):
    assert [s.id for s in drive_test] == [f"{i:02d}_test" for i in range(1, 21)]
    vessel = sum(int(s.label[s.fov].sum()) for s in drive_test)
    background = sum(int((s.label[s.fov] == 0).sum()) for s in drive_test)
    assert (vessel, background) == (577_649, 3_960_494)
    assert all(s.image.shape == (584, 565, 3) and s.image.dtype == np.uint8 for s in drive_test)


def test_palette_second_observer_reads_as_binary_and_matches_the_human_reference(drive_root, drive_test):
    from PIL import Image

    raw = Image.open(drive_root / "test" / "2nd_manual" / "01_manual2.gif")
    assert raw.mode == "P" and set(np.unique(np.asarray(raw))) == {0, 1}
    first = np.concatenate([s.label[s.fov] for s in drive_test]).astype(bool)
    second = np.concatenate([s.second_label[s.fov] for s in drive_test]).astype(bool)
    tp, fp, fn = (first & second).sum(), (~first & second).sum(), (first & ~second).sum()
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(0.7891, abs=5e-5)
    assert (first == second).mean() == pytest.approx(0.9473, abs=5e-5)


def test_folder_and_zip_read_the_same(drive_root, tmp_path):
    folder = link_drive(drive_root, tmp_path / "DRIVE", "training", (21, 22))
    archive = tmp_path / "DRIVE.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(tmp_path))  # members under DRIVE/, as distributed
    from_folder, from_zip = read_split("drive", folder, "train"), read_split("drive", archive, "train")
    assert [s.id for s in from_folder] == [s.id for s in from_zip] == ["21_training", "22_training"]
    for a, b in zip(from_folder, from_zip):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and np.array_equal(a.fov, b.fov)


def test_missing_dataset_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(DataError, match="experiment=demo") as error:
        read_split("drive", tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_image_without_label_is_named(drive_root, tmp_path):
    link_drive(drive_root, tmp_path, "training", (21, 22))
    (tmp_path / "training" / "1st_manual" / "22_manual1.gif").unlink()
    with pytest.raises(DataError, match="22_training.tif has no 1st_manual"):
        read_split("drive", tmp_path, "train")


def test_patches_are_centred_in_the_fov_and_deterministic():
    samples = synthetic_samples(3, seed=5, height=120, width=110)
    for s in samples:
        s.image[...] = 0
        s.image[s.fov] = 255  # a patch's centre pixel is white exactly when it lies in the FOV
    dataset = PatchDataset(samples, patch_size=16, preprocessing=Preprocessing(), augment=False, seed=3, length=50)
    batch = dataset.collate([dataset[k] for k in range(50)]).finish()
    assert batch["image"].shape == (50, 3, 16, 16) and batch["label"].shape == batch["fov"].shape == (50, 1, 16, 16)
    assert batch["fov"][:, 0, 8, 8].all() and (batch["image"][:, 0, 8, 8] == 1.0).all()
    augmented = PatchDataset(samples, 16, Preprocessing(), augment=True, seed=3, length=5)
    again = PatchDataset(samples, 16, Preprocessing(), augment=True, seed=3, length=5)
    first, second = (patches.collate([patches[k] for k in range(5)]).finish() for patches in (augmented, again))
    assert all(torch.equal(first[key], second[key]) for key in ("image", "label", "fov"))
    # A patch depends on its own index only, not on the batch it is drawn in.
    alone = augmented.collate([augmented[3]]).finish()
    assert torch.allclose(alone["image"][0], first["image"][3], atol=1e-6)
    assert torch.equal(alone["label"][0], first["label"][3])


def test_training_batches_are_finished_after_their_transfer():
    samples = synthetic_samples(2, seed=5, height=80, width=80)
    dataset = PatchDataset(samples, 16, Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3), seed=3, length=4)
    batch = dataset.collate([dataset[k] for k in range(4)])
    # The loader hands over uint8 crops with room for the warp; Lightning moves every tensor with `to`.
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, 24, 24)
    moved = batch.to("meta")
    assert all(getattr(moved, name).is_meta for name in ("images", "labels", "fovs", "warps", "jitter"))
    # The module finishes a training batch after the transfer and passes whole images on as they are.
    module = VesselSegmentationModule(base_channels=4, depth=2)
    finished = module.on_after_batch_transfer(batch, 0)
    expected = batch.finish()
    assert finished["image"].shape == (4, 3, 16, 16)
    assert all(torch.equal(finished[key], expected[key]) for key in ("image", "label", "fov"))
    whole = {"image": torch.zeros(1, 3, 8, 8)}
    assert module.on_after_batch_transfer(whole, 0) is whole


def test_each_epoch_draws_new_patch_indices():
    sampler = EpochSampler(8)
    first = list(sampler)
    sampler.set_epoch(1)
    assert first == list(range(8)) and list(sampler) == list(range(8, 16)) and len(sampler) == 8


def test_split_is_by_image_and_fixed_by_seed():
    dm = FundusDataModule(dataset="synthetic", synthetic_images=6, synthetic_size=(96, 96), val_images=2, patch_size=32)
    dm.setup("fit")
    train_ids, val_ids = [s.id for s in dm.train_samples], [s.id for s in dm.val_samples]
    assert len(train_ids) == 4 and len(val_ids) == 2 and not set(train_ids) & set(val_ids)
    other = FundusDataModule(
        dataset="synthetic", synthetic_images=6, synthetic_size=(96, 96), val_images=2, patch_size=32
    )
    other.setup("fit")
    assert [s.id for s in other.val_samples] == val_ids
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (1, 3, 96, 96) and batch["fov"].dtype == torch.bool


def test_clahe_raises_vessel_contrast_and_applies_to_every_split(drive_test):
    s = drive_test[0]
    out = equalize_contrast(s.image)
    assert out.shape == s.image.shape and out.dtype == np.uint8
    # Vessels stand out more from the background in the green channel, where they show best.
    vessel, background = s.label.astype(bool) & s.fov, ~s.label.astype(bool) & s.fov

    def gap(image):
        green = image[..., 1].astype(float)
        return (green[background].mean() - green[vessel].mean()) / green[s.fov].std()

    assert gap(out) > 1.5 * gap(s.image) > 0
    # Training patches, validation and test images all go through it; the samples themselves stay as read.
    dm = FundusDataModule(
        dataset="synthetic", synthetic_images=4, synthetic_size=(96, 96), val_images=1, patch_size=32, clahe=True
    )
    dm.setup()
    for loader, samples in ((dm.val_dataloader(), dm.val_samples), (dm.test_dataloader(), dm.test_samples)):
        for batch, sample in zip(loader, samples, strict=True):
            expected = torch.from_numpy(equalize_contrast(sample.image)).permute(2, 0, 1).float() / 255
            assert torch.equal(batch["image"][0], expected) and not np.array_equal(
                sample.image, equalize_contrast(sample.image)
            )
    patches = dm.train_dataloader().dataset
    pad = patches.pad
    for image, sample in zip(patches.images, dm.train_samples, strict=True):
        assert np.array_equal(image[:, pad:-pad, pad:-pad], equalize_contrast(sample.image).transpose(2, 0, 1))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="val_images=6 leaves no training image"):
        FundusDataModule(dataset="synthetic", synthetic_images=6, synthetic_size=(64, 64), val_images=6).setup("fit")
    with pytest.raises(ConfigError, match=r"data.batch_size must be an integer >= 1; got 0"):
        FundusDataModule(dataset="synthetic", batch_size=0)


def test_a_resumed_epoch_skips_the_patches_already_trained_on():
    sampler = EpochSampler(8, epoch=1, skip=3)
    assert list(sampler) == [11, 12, 13, 14, 15] and len(sampler) == 8
    sampler.set_epoch(1)
    assert list(sampler)[0] == 11
    sampler.set_epoch(2)
    assert list(sampler) == list(range(16, 24))
