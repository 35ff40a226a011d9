"""LightningDataModule: random FOV-centred training patches, whole images for validation and test."""

import warnings
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from retinaseg.core.errors import ConfigError, DataError, check_bool, check_choice, check_int, check_number
from retinaseg.data import sources, splits
from retinaseg.data.augment import Augmentation, PatchBatch, augmentation_tensors, context_size
from retinaseg.data.preprocess import Preprocessing
from retinaseg.data.sample import Sample

# A run resumed mid-epoch continues the patch stream exactly (FundusDataModule.state_dict), which
# Lightning cannot tell: it only knows data loaders that have their own state_dict.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

CROPS = ("fov", "centre")


def check_channels(name: str, values, positive: bool = False) -> list[float]:
    """Three per-channel numbers (R, G, B), each > 0 when `positive`."""
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != 3:
        raise ConfigError(f"{name} must be three numbers (R, G, B); got {values!r}")
    return [
        check_number(f"{name}[{i}]", v, 0 if positive else None, include_minimum=not positive)
        for i, v in enumerate(values)
    ]


class PatchDataset(Dataset):
    """Patches of `patch_size` whose centres lie inside the FOV, cut on the fly from images held once, at the
    working resolution (`preprocessing`: data.scale and CLAHE applied to the whole images first).

    Item `k` is drawn from a generator seeded with (seed, k), so a patch depends only on its index:
    the same in any worker, after a resume, and different in each epoch (the sampler gives each epoch
    its own range of indices). With `crop="centre"` item `k` is instead image `k mod n` cut around its
    centre, zero-padded where the patch is larger: the seed's whole-image training.

    An item is the patch's crop as stored (uint8, with room around the patch for the warp when `augment`) and its
    drawn Augmentation; `collate` stacks them into a PatchBatch, which is warped, cut and standardised as a whole on
    the training device (retinaseg.data.augment).
    """

    def __init__(
        self,
        samples: list[Sample],
        patch_size: int,
        preprocessing: Preprocessing,
        augment: bool = True,
        seed: int = 0,
        length: int = 1,
        crop: str = "fov",
    ):
        self.patch_size, self.crop, self.augment = patch_size, crop, augment
        self.context = context_size(patch_size) if augment else patch_size
        self.preprocessing, self.seed, self.length = preprocessing, seed, length
        # Images, labels and FOV masks at the working resolution (data.scale), contrast-equalised once, whole.
        images = [preprocessing.image(s.image) for s in samples]
        labels = [preprocessing.mask(s.label) for s in samples]
        fovs = [preprocessing.mask(s.fov) for s in samples]
        for s, fov in zip(samples, fovs) if crop == "fov" else []:
            if min(fov.shape) < patch_size:
                raise ConfigError(
                    f"data.patch_size={patch_size} is larger than image {s.id} ({fov.shape[1]}x{fov.shape[0]}"
                    f"{f' at data.scale={preprocessing.scale}' if preprocessing.scale != 1 else ''})."
                )
        # Zero padding lets a patch centred near the border be cut without special cases. Channels first, as the
        # batch is.
        pad = self.pad = self.context // 2 + 1
        self.images = [np.pad(image, ((pad, pad), (pad, pad), (0, 0))).transpose(2, 0, 1).copy() for image in images]
        self.labels = [np.pad(label.astype(np.uint8), pad) for label in labels]
        self.fovs = [np.pad(fov.astype(np.uint8), pad) for fov in fovs]
        self.centres = [np.flatnonzero(fov).astype(np.int64) for fov in fovs]
        self.widths = [fov.shape[1] for fov in fovs]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Augmentation | None]:
        """(image (3, C, C), label (C, C), FOV mask (C, C), augmentation): the uint8 crop around patch `index`."""
        rng = np.random.default_rng([self.seed, index])
        if self.crop == "centre":
            i = index % len(self.images)
            row, col = (size // 2 for size in self.labels[i].shape)
            row, col = row - self.pad, col - self.pad
        else:
            i = int(rng.integers(len(self.images)))
            row, col = divmod(int(self.centres[i][rng.integers(len(self.centres[i]))]), self.widths[i])
        top, left = row + self.pad - self.context // 2, col + self.pad - self.context // 2
        window = (slice(top, top + self.context), slice(left, left + self.context))
        augmentation = Augmentation.draw(rng) if self.augment else None
        return self.images[i][(slice(None), *window)], self.labels[i][window], self.fovs[i][window], augmentation

    def collate(self, items: list[tuple]) -> PatchBatch:
        """The batch of `items`: their crops and augmentations, warped and cut when it is finished
        (PatchBatch.finish, on the training device)."""
        images, labels, fovs, augmentations = zip(*items)
        return PatchBatch(
            torch.from_numpy(np.stack(images)),
            torch.from_numpy(np.stack(labels)[:, None]),
            torch.from_numpy(np.stack(fovs)[:, None]),
            *(augmentation_tensors(augmentations) if self.augment else (None, None)),
            self.patch_size,
            self.preprocessing,
        )


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes of a DDP run; (0, 1) outside one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class EpochSampler(Sampler[int]):
    """Indices `epoch * n ... (epoch + 1) * n - 1`, dealt round-robin to the processes of a DDP run.

    `n` (data.patches_per_epoch) is the total over all processes, so an epoch means the same whatever
    the number of GPUs. Lightning calls `set_epoch` at the start of every training epoch. A run resumed
    mid-epoch starts at that epoch and skips the `skip` indices (per process) it has already trained on;
    its length stays the whole epoch's, as Lightning counts the resumed epoch's batches from where it was.
    """

    def __init__(self, num_patches: int, epoch: int = 0, skip: int = 0):
        self.num_patches = num_patches
        self.epoch, self.skip = epoch, skip

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0  # only the interrupted epoch is partly done
        self.epoch = epoch

    def _shard(self) -> range:
        rank, world = rank_and_world_size()
        start = self.epoch * self.num_patches
        return range(start + rank, start + self.num_patches, world)

    def __iter__(self):
        return iter(self._shard()[self.skip :])

    def __len__(self) -> int:
        return len(self._shard())


class ImageShardSampler(Sampler[int]):
    """Images `0 ... n-1` dealt round-robin to the processes of a DDP run, each to exactly one (no padding), so
    metrics pooled over the processes count every image once, as on one device.

    With fewer images than processes every process takes them all, so that none sits out the epoch-end sync:
    each image then counts once per process, which leaves every pooled ratio and the AUC unchanged.
    """

    def __init__(self, num_images: int):
        self.num_images = num_images

    def _shard(self) -> range:
        rank, world = rank_and_world_size()
        return range(rank, self.num_images, world) if self.num_images >= world else range(self.num_images)

    def __iter__(self):
        return iter(self._shard())

    def __len__(self) -> int:
        return len(self._shard())


class WholeImageDataset(Dataset):
    """Whole photographs prepared for the model (data.scale, CLAHE, normalisation), with their label and FOV mask
    at the original resolution: the module scores probabilities resized back to it."""

    def __init__(self, samples: list[Sample], preprocessing: Preprocessing):
        self.samples, self.preprocessing = samples, preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        return {
            "image": self.preprocessing.tensor(s.image),
            "label": torch.from_numpy(s.label).float()[None],
            "fov": torch.from_numpy(s.fov)[None],
            "id": s.id,
        }


class FundusDataModule(L.LightningDataModule):
    """A fundus dataset (`dataset`: drive, stare, chase_db1, hrf, folder, synthetic; read from `root`), split into
    train, validation and test images.

    Without `folds`: the dataset's official split, with `val_images` of its training images held out (by image,
    chosen by `split_seed`) for validation. With `folds=K`: every labelled image pooled, fold `fold` of K tested,
    validation held out of the others (retinaseg.data.splits). `train_samples`, `val_samples` and `test_samples`
    are as read (original resolution); the loaders apply the preprocessing (`scale`, `clahe`, `mean`, `std`).
    """

    def __init__(
        self,
        dataset: str = "drive",
        root: str | None = None,
        scale: float = 1.0,
        folds: int | None = None,
        fold: int | None = None,
        val_images: int = 4,
        split_seed: int = 0,
        patch_size: int = 64,
        crop: str = "fov",
        patches_per_epoch: int = 4096,
        batch_size: int = 32,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        augment: bool = True,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        clahe: bool = False,
        seed: int = 0,
        synthetic_images: int = 20,
        synthetic_size: Sequence[int] = (584, 565),
    ):
        super().__init__()
        # Checked here, where the settings are read, so a bad one is named before any image is read; data.scale
        # by Preprocessing, data.folds and data.fold by the split (retinaseg.data.splits.kfold), when the images
        # are listed.
        check_choice("data.dataset", dataset, sources.DATASETS)
        if root is not None and not isinstance(root, str):
            raise ConfigError(f"data.root must be a path; got {root!r}")
        if folds is None and fold is not None:
            # Without folds the official split is used whatever the fold: `-m 'data.fold=range(5)'` alone would
            # train the same run five times.
            raise ConfigError(
                f"data.fold={fold} is set without data.folds: a fold is one of data.folds=K cross-validation folds. "
                "Set data.folds too (e.g. -m data.folds=5 'data.fold=range(5)'), or leave data.fold unset for the "
                "dataset's official split."
            )
        for name, value, minimum in (
            ("val_images", val_images, 1),
            ("split_seed", split_seed, None),
            ("patch_size", patch_size, 1),
            ("patches_per_epoch", patches_per_epoch, 1),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("seed", seed, None),
            ("synthetic_images", synthetic_images, 2),
        ):
            check_int(f"data.{name}", value, minimum)
        check_choice("data.crop", crop, CROPS)
        for name, value in (("augment", augment), ("clahe", clahe)):
            check_bool(f"data.{name}", value)
        check_channels("data.mean", mean)
        check_channels("data.std", std, positive=True)
        if not isinstance(synthetic_size, Sequence) or len(synthetic_size) != 2:
            raise ConfigError(f"data.synthetic_size must be [height, width]; got {synthetic_size!r}")
        for i, size in enumerate(synthetic_size):
            check_int(f"data.synthetic_size[{i}]", size, 1)
        self.save_hyperparameters()
        self.preprocessing = Preprocessing(mean, std, clahe, scale)
        self._catalogue = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        # (epoch, batches of it done) where training resumes; see state_dict.
        self.resume_at = (0, 0)

    @property
    def catalogue(self):
        """The dataset's labelled images, listed once (nothing is read until samples are asked for)."""
        if self._catalogue is None:
            hp = self.hparams
            if hp.dataset == "synthetic":
                self._catalogue = sources.SyntheticCatalogue(hp.synthetic_images, hp.synthetic_size, hp.seed)
            else:
                self._catalogue = sources.open_dataset(hp.dataset, hp.root)
        return self._catalogue

    def ids(self, part: str) -> list[str]:
        """The image ids of `part`: "train", "val", "test" or "all" (every labelled image)."""
        hp = self.hparams
        fold = 0 if hp.fold is None else hp.fold
        return splits.split_ids(self.catalogue, part, hp.folds, fold, hp.val_images, hp.split_seed)

    def samples(self, part: str) -> list[Sample]:
        """The Samples of `part` (see `ids`), as read: original resolution, no preprocessing."""
        return self._with_vessels(list(self.catalogue.read(self.ids(part))), part)

    def _with_vessels(self, samples: list[Sample], part: str) -> list[Sample]:
        """`samples`, refused when none of their labels holds a vessel pixel: training on them would learn to
        predict nothing and scoring on them gives F1 0, both without another sign of what went wrong."""
        if samples and not any(s.label.any() for s in samples):
            raise DataError(
                f"none of the {len(samples)} {part} labels of data.dataset={self.hparams.dataset} "
                f"(data.root={self.hparams.root}) holds a vessel pixel, e.g. that of {samples[0].id}: the labels "
                "are empty. A label must show vessels as the brighter of its two values; check the label files."
            )
        return samples

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and not self.train_samples:
            train, val = self.ids("train"), self.ids("val")
            samples = {s.id: s for s in self.catalogue.read(train + val)}  # one pass over the files
            self.train_samples = self._with_vessels([samples[i] for i in train], "train")
            self.val_samples = [samples[i] for i in val]
        if stage in (None, "test") and not self.test_samples:
            self.test_samples = self.samples("test")

    def state_dict(self) -> dict:
        """Where training stands in the patch stream, saved in each checkpoint: a resumed run draws the
        patches an uninterrupted one would. (Lightning creates the resumed run's loader, and its workers
        fetch ahead, before it tells the sampler the epoch, so the sampler must know it from the start.)"""
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done >= self.trainer.num_training_batches:  # saved at the end of an epoch: the next one is due
            return {"epoch": self.trainer.current_epoch + 1, "batches_done": 0}
        return {"epoch": self.trainer.current_epoch, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.resume_at = (state["epoch"], state["batches_done"])

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = PatchDataset(
            self.train_samples, hp.patch_size, self.preprocessing, hp.augment, hp.seed, hp.patches_per_epoch, hp.crop
        )
        epoch, batches_done = self.resume_at
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=EpochSampler(hp.patches_per_epoch, epoch, batches_done * hp.batch_size),
            collate_fn=dataset.collate,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            drop_last=False,
        )

    def _whole_images(self, samples: list[Sample]) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            WholeImageDataset(samples, self.preprocessing),
            batch_size=hp.eval_batch_size,
            sampler=ImageShardSampler(len(samples)),
            num_workers=hp.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._whole_images(self.val_samples)

    def test_dataloader(self) -> DataLoader:
        return self._whole_images(self.test_samples)
