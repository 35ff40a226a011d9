"""Helpers shared by the tests: composing the project's Hydra configs as the entry points do, running an
entry point as a user would, small datasets in the exact layouts and file formats of DRIVE, STARE, CHASE_DB1,
HRF and `folder` (built from the images given), the original network, and reading back what an offline W&B run
recorded."""

import gzip
import importlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from wandb.proto import wandb_internal_pb2

from retinaseg.core import config
from retinaseg.data import sources
from retinaseg.data.sample import Sample
from retinaseg.data.sources.stare import LABELLED as STARE_LABELLED
from retinaseg.data.sources.synthetic import synthetic_samples

CONF = str(Path(__file__).resolve().parents[1] / "retinaseg" / "conf")
# ../shared/seed next to the project: the original notebook's network, verbatim (see its README.md).
SEED_DIR = Path(__file__).resolve().parents[2] / "shared" / "seed"

# A tiny but real configuration: small U-Net, few small synthetic images, one short epoch.
TINY = [
    "model.base_channels=4",
    "model.depth=2",
    "data.patch_size=32",
    "data.patches_per_epoch=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.precision=32-true",
]
TINY_SYNTHETIC = TINY + [
    "data=synthetic",
    "data.synthetic_images=4",
    "data.synthetic_size=[96,96]",
    "data.val_images=1",
]


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The entry point `name`'s config with `overrides`, its run directory `output_dir` (Hydra's callbacks, which
    claim the run directory, do not run)."""
    config.setup()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_entry_point(name: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m retinaseg.<name> <args>` in `cwd`, as a user would type it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"retinaseg.{name}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def run_module(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m retinaseg.train <args>`."""
    return run_entry_point("train", args, cwd, **env)


def write_checkpoint(path: Path, cfg: DictConfig, resumable: bool = True) -> Path:
    """A retinaseg checkpoint of the untrained model and the data settings of training config `cfg`, as a run
    would save it, without training: `resumable` adds the (empty) optimizer and loop state a resume needs."""
    from retinaseg.model.module import VesselSegmentationModule

    model, data = (
        {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items() if k != "_target_"}
        for group in ("model", "data")
    )
    torch.manual_seed(0)
    module = VesselSegmentationModule(**model)
    content = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": data,
    }
    if resumable:
        content.update(epoch=0, global_step=2, optimizer_states=[], lr_schedulers=[], loops={}, callbacks={})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines an entry point printed."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def fill_disk(folder: Path, left: int) -> None:
    """Fill the filesystem of `folder` (a small tmpfs) with one file until `left` bytes are free."""
    stat = os.statvfs(folder)
    (folder / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - left))


def make_drive(root: Path, numbers=(21, 22), split: str = "training", size=(48, 40)) -> Path:
    """A DRIVE-layout folder (tif images, gif labels and masks, DRIVE's names) of small synthetic images."""
    for folder in ("images", "1st_manual", "mask"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for number, s in zip(numbers, synthetic_samples(len(numbers), height=size[0], width=size[1])):
        Image.fromarray(s.image).save(root / split / "images" / f"{number:02d}_{split}.tif")
        Image.fromarray(s.label * 255).save(root / split / "1st_manual" / f"{number:02d}_manual1.gif")
        Image.fromarray(s.fov.astype(np.uint8) * 255).save(root / split / "mask" / f"{number:02d}_{split}_mask.gif")
    return root


def seed_unet():
    """The original notebook's module `seed_unet` (build_unet, dice_loss), imported from ../shared/seed.

    Not skipped when missing: every checkout this project is tested in has ../shared next to it.
    """
    if not (SEED_DIR / "seed_unet.py").is_file():
        raise FileNotFoundError(f"the original network is expected at {SEED_DIR / 'seed_unet.py'} (../shared/seed)")
    if str(SEED_DIR) not in sys.path:
        sys.path.insert(0, str(SEED_DIR))
    return importlib.import_module("seed_unet")


def wandb_records(path: Path) -> list:
    """The records of an offline run's `.wandb` file: W&B's own protobuf `Record`s, in LevelDB's log format (32 KiB
    blocks of chunks, each with a 7-byte header: crc32, length, type; type 1 is a whole record, 2-4 its
    first/middle/last part). wandb 0.31 ships no reader of its own for these files."""
    data, block, pos = path.read_bytes(), 32768, 7  # after the file header
    records, parts = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
        elif kind == 0:  # zero padding at the end of a block
            parts = b""
    return records


def _items(items) -> dict:
    """Config, summary or history items by key (a nested key's parts joined by `/`), their values parsed."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@dataclass
class WandbRun:
    """What one offline W&B run recorded: its run record (run_id, display_name, run_group, job_type, project,
    tags), its config (given at start and updated), its final summary, its history rows, all its records, and
    the path of its `.wandb` file."""

    run: object
    config: dict
    summary: dict
    history: list[dict]
    records: list
    path: Path

    @property
    def files(self) -> Path:
        """The run's files folder (images, tables)."""
        return self.path.parent / "files"


def wandb_run(path: Path) -> WandbRun:
    """The offline run whose `.wandb` file is `path`."""
    records = wandb_records(path)
    (run,) = [r.run for r in records if r.HasField("run")]
    config = _items(run.config.update)
    summary: dict = {}
    for r in records:
        if r.HasField("config"):
            config.update(_items(r.config.update))
        elif r.HasField("summary"):  # each record updates some keys; the last value of each is the summary's
            summary.update(_items(r.summary.update))
    history = [_items(r.history.item) for r in records if r.HasField("history")]
    return WandbRun(run, config, summary, history, records, path)


def wandb_runs(directory: Path) -> list[WandbRun]:
    """Every offline W&B run under `directory` (a run directory, or a sweep's), by path."""
    return [wandb_run(path) for path in sorted(directory.rglob("offline-run-*/run-*.wandb"))]


def read_split(dataset: str, root, split: str) -> list[Sample]:
    """Every Sample of a dataset's official split ("train", "test") or of "all" its labelled images."""
    catalogue = sources.open_dataset(dataset, root)
    return list(catalogue.read(catalogue.ids(split)))


def encode(array: np.ndarray, suffix: str, **params) -> bytes:
    """An RGB or grayscale uint8 array as the bytes of an image file (PIL's encoders)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=Image.registered_extensions()[suffix.lower()], **params)
    return buffer.getvalue()


def mask_file(mask: np.ndarray, rgb: bool = False) -> np.ndarray:
    """A {0, 1} mask as the 0/255 image the datasets store (grayscale, or R=G=B)."""
    gray = (np.asarray(mask) > 0).astype(np.uint8) * 255
    return np.stack([gray] * 3, axis=-1) if rgb else gray


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    """A .zip or .tar holding `members` (name: bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(path, "w") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def make_stare(root: Path, samples: list[Sample], names=None, unlabelled: int = 1) -> Path:
    """STARE as distributed: stare-images.tar, labels-ah.tar (the samples' labels) and labels-vk.tar (their
    second_label, where they have one) of gzipped P6 PPMs named imNNNN[.ah|.vk].ppm.gz; `unlabelled` more
    photographs without labels, as in the full image tar."""
    names = names or STARE_LABELLED[: len(samples)]
    images = {f"{n}.ppm.gz": gzip.compress(encode(s.image, ".ppm")) for n, s in zip(names, samples)}
    for k in range(unlabelled):
        images[f"im{400 + k:04d}.ppm.gz"] = gzip.compress(encode(samples[0].image, ".ppm"))
    ah = {f"{n}.ah.ppm.gz": gzip.compress(encode(mask_file(s.label, rgb=True), ".ppm")) for n, s in zip(names, samples)}
    vk = {
        f"{n}.vk.ppm.gz": gzip.compress(encode(mask_file(s.second_label, rgb=True), ".ppm"))
        for n, s in zip(names, samples)
        if s.second_label is not None
    }
    write_archive(root / "stare-images.tar", images)
    write_archive(root / "labels-ah.tar", ah)
    if vk:
        write_archive(root / "labels-vk.tar", vk)
    return root


def chase_names(count: int) -> list[str]:
    """CHASE_DB1's photographs in order: Image_01L, Image_01R, Image_02L, ..."""
    return [f"Image_{k // 2 + 1:02d}{'LR'[k % 2]}" for k in range(count)]


def make_chase(path: Path, samples: list[Sample], names=None) -> Path:
    """CHASE_DB1 as distributed: one flat zip of Image_NN[LR].jpg, _1stHO.png and _2ndHO.png (the samples'
    second_label, else their label)."""
    members = {}
    for name, s in zip(names or chase_names(len(samples)), samples):
        members[f"{name}.jpg"] = encode(s.image, ".jpg", quality=95)
        members[f"{name}_1stHO.png"] = encode(mask_file(s.label), ".png")
        second = s.second_label if s.second_label is not None else s.label
        members[f"{name}_2ndHO.png"] = encode(mask_file(second), ".png")
    return write_archive(path, members)


def hrf_names(count: int) -> list[str]:
    """HRF's photographs: 01_dr, 01_g, 01_h, 02_dr, ..."""
    return [f"{k // 3 + 1:02d}_{('dr', 'g', 'h')[k % 3]}" for k in range(count)]


def make_hrf(path: Path, samples: list[Sample], names=None) -> Path:
    """HRF as in all.zip: images/NN_dr.JPG and NN_g.jpg / NN_h.jpg, manual1/NN_x.tif, mask/NN_x_mask.tif (RGB)."""
    members = {}
    for name, s in zip(names or hrf_names(len(samples)), samples):
        members[f"images/{name}.{'JPG' if name.endswith('dr') else 'jpg'}"] = encode(s.image, ".jpg", quality=95)
        members[f"manual1/{name}.tif"] = encode(mask_file(s.label), ".tif")
        members[f"mask/{name}_mask.tif"] = encode(mask_file(s.fov, rgb=True), ".tif")
    return write_archive(path, members)


def make_folder(root: Path, samples: list[Sample], split: str = "train", masks: bool = True) -> Path:
    """The `folder` layout: <split>/images/<id>.png, <split>/labels/<id>_label.png, <split>/masks/<id>_mask.png."""
    for s in samples:
        for folder, name, data in (
            ("images", f"{s.id}.png", encode(s.image, ".png")),
            ("labels", f"{s.id}_label.png", encode(mask_file(s.label), ".png")),
            *([("masks", f"{s.id}_mask.png", encode(mask_file(s.fov), ".png"))] if masks else []),
        ):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            (root / split / folder / name).write_bytes(data)
    return root
