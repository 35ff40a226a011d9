"""Weights & Biases, never online: what a run logs (read back from W&B's own run files), a resumed training
continuing its W&B run, and how the mode is chosen without touching the network."""

import csv
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from wandb.proto import wandb_internal_pb2

from helpers import TINY_SYNTHETIC, compose_config, run_module
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.module import VesselSegmentationModule

OFFLINE = {"WANDB_MODE": "offline"}
RUN = TINY_SYNTHETIC + [
    "logger=wandb",
    "experiment=drive_cpu",
    "model.lr=0.01",
    "data.patches_per_epoch=64",
    "trainer.max_epochs=2",
]


def wandb_records(run_dir: Path) -> list:
    """The records of the run's `.wandb` file: W&B's protobuf Records in LevelDB's log format (32 KiB blocks of
    chunks, each with a 7-byte header: crc32, length, type; type 1 is a whole record, 2-4 its first/middle/last part)."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
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


def history(records) -> list[dict]:
    return [
        {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.HasField("history")
    ]


def config(records) -> dict:
    return {
        u.key or "/".join(u.nested_key): json.loads(u.value_json)
        for r in records
        if r.HasField("config")
        for u in r.config.update
    }


def wandb_env(tmp_path: Path, **extra) -> dict:
    """The environment without any W&B mode or credentials: no key, empty W&B settings, no .netrc."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "NETRC": str(tmp_path / "no-netrc"), **extra}


def test_offline_run_holds_config_metrics_and_images(tmp_path):
    run_dir = tmp_path / "run"
    result = run_module(RUN + [f"hydra.run.dir={run_dir}"], cwd=tmp_path, **OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    records = wandb_records(run_dir)

    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.project == "retinaseg" and run.run_group == "drive_cpu" and "drive_cpu" in run.tags
    logged_config = config(records)
    assert logged_config["model"]["base_channels"] == 4 and logged_config["data"]["source"] == "synthetic"
    assert logged_config["parameters"] == sum(
        p.numel() for p in VesselSegmentationModule(base_channels=4, depth=2).parameters()
    )
    assert re.fullmatch(r"[0-9a-f]{40}", logged_config["git_commit"])

    rows = history(records)
    val_rows = [row for row in rows if "val/f1" in row]
    with open(run_dir / "csv" / "metrics.csv") as file:
        csv_val = next(row for row in csv.DictReader(file) if row.get("val/f1"))
    assert len(val_rows) == 2
    assert all(val_rows[0][key] == float(value) for key, value in csv_val.items() if key.startswith("val/"))
    (test_f1,) = [row["test/f1"] for row in rows if "test/f1" in row]
    assert test_f1 == json.loads((run_dir / "metrics.json").read_text())["f1"]

    # One image per validation epoch (the sanity check logs none), with the validation image's true vessels.
    images = [row for row in rows if "val/predictions/filenames" in row]
    assert len(images) == 2
    datamodule = FundusDataModule(
        source="synthetic", synthetic_images=4, synthetic_size=(96, 96), val_images=1, seed=42
    )
    datamodule.setup("fit")
    files = next(run_dir.glob("wandb/offline-run-*/files"))
    for row in images:
        assert row["val/predictions/captions"] == [datamodule.val_samples[0].id]
        assert Image.open(files / row["val/predictions/filenames"][0]).size == (96, 96)
        masks = row["val/predictions/all_masks"][0]
        truth = np.array(Image.open(files / masks["ground_truth"]["path"]))
        np.testing.assert_array_equal(truth, datamodule.val_samples[0].label)
        predicted = np.array(Image.open(files / masks["prediction"]["path"]))
        assert set(np.unique(predicted)) <= {0, 1} and not predicted[~datamodule.val_samples[0].fov].any()

    sync = re.search(r"upload it with: wandb sync (\S+)", (run_dir / "train.log").read_text())
    assert sync and Path(sync.group(1)).parent == run_dir / "wandb" and list(Path(sync.group(1)).glob("*.wandb"))

    # Resuming from its checkpoint, in a new run directory, continues the same W&B run.
    resumed = tmp_path / "resumed"
    result = run_module(
        RUN
        + [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=3", f"hydra.run.dir={resumed}"],
        cwd=tmp_path,
        **OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (resumed_run,) = [r.run for r in wandb_records(resumed) if r.HasField("run")]
    assert resumed_run.run_id == run.run_id


def test_mode_comes_from_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_config("train", ["logger=wandb"], tmp_path).logger.wandb.mode == "disabled"


def test_without_api_key_mode_is_offline_and_no_network_is_touched(tmp_path):
    # Python's audit hooks see every connection, name lookup, datagram and child process this process attempts.
    code = (
        "import sys\n"
        "from retinaseg.tracking import resolve_mode\n"
        "attempts = []\n"
        "network = ('socket.connect', 'socket.getaddrinfo', 'socket.sendto', 'socket.sendmsg', 'subprocess.Popen')\n"
        "sys.addaudithook(lambda event, args: attempts.append(event) if event in network else None)\n"
        "print(resolve_mode(None), attempts)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=wandb_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "offline []"


def test_unreachable_server_falls_back_to_offline_within_the_timeout(tmp_path):
    with socket.socket() as probe:  # a local port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from retinaseg.tracking import WandbLogger, finishing_wandb_run\n"
        "with finishing_wandb_run():\n"
        "    run = WandbLogger(init_timeout=3, save_dir=sys.argv[1], project='retinaseg').experiment\n"
        "    print('mode', run.settings.mode)\n"
    )
    env = wandb_env(tmp_path, WANDB_API_KEY="a" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}")
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mode offline" in result.stdout
    assert "did not start online" in result.stderr and "wandb sync" in result.stderr
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
