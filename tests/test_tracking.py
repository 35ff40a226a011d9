"""Weights & Biases, never online: what runs log (read back from W&B's own run files), how they are named, grouped
and summarised, an evaluation joining the training run it scores, a resumed training continuing its W&B run, and
how the mode is chosen without touching the network."""

import csv
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from helpers.commands import run_entry_point, run_module
from helpers.configs import CONF, TINY_SYNTHETIC, compose_config
from helpers.wandb_records import wandb_runs
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.model.checkpoint import load_checkpoint
from retinaseg.model.module import VesselSegmentationModule
from retinaseg.tracking.identity import flat_params, hydra_identity, run_name, sweep_group
from retinaseg.tracking.reports import flat_numbers
from retinaseg.tracking.wandb import use_training_artifact

OFFLINE = {"WANDB_MODE": "offline"}
RUN = TINY_SYNTHETIC + [
    "logger=wandb",
    "experiment=drive_cpu",
    "model.lr=0.01",
    "data.patches_per_epoch=64",
    "trainer.max_epochs=2",
    # drive_cpu trains for a 15-minute budget; two epochs here.
    "budget=null",
]
# RUN's overrides that say what it is, shortened, after its experiment (data.patches_per_epoch and
# trainer.max_epochs are given twice: the last value counts, in the place of the first).
RUN_NAME = (
    "drive_cpu base_channels=4 depth=2 patch_size=32 patches_per_epoch=64 batch_size=16 max_epochs=2 "
    "precision=32-true data=synthetic synthetic_images=4 synthetic_size=[96,96] val_images=1 lr=0.01 budget=null"
)
REPORTED = ("f1", "auc", "accuracy", "sensitivity", "specificity", "precision", "recall", "iou")


# Names, groups and flat config, without W&B.


def test_run_name_is_experiment_or_task_and_the_overrides_that_say_what_the_run_is():
    command_line = [
        "experiment=drive_cpu",
        "model.lr=0.001",
        "model.base_channels=32",
        "data.root=/data/DRIVE",  # where things are, how the run is logged: not what it is
        "ckpt_path=runs/a/checkpoints/last.ckpt",
        "resume=null",
        "logger=wandb",
        "logger.wandb.project=other",
        "hydra.run.dir=outputs/x",
        "paths.log_dir=logs",
        "tags=[baseline]",
        "hparams_search=optuna",
        "+data.extra=some/folder",  # any value with a `/` is a path
    ]
    assert run_name("train", "drive_cpu", command_line) == "drive_cpu lr=0.001 base_channels=32"
    assert run_name("train", None, []) == "train"
    assert run_name("eval", None, ["threshold=val", "tta=true", "split=val"]) == "eval threshold=val tta=true split=val"


def test_run_name_keeps_keys_apart_and_values_short():
    assert run_name("train", None, ["model.inference.batch_size=2", "model.depth=3"]) == (
        "train inference.batch_size=2 depth=3"
    )
    assert run_name("train", None, ["data.seed=1", "model.seed=2", "seed=3"]) == "train data.seed=1 model.seed=2 seed=3"
    # An Optuna trial's float, a later value of the same key, a removed entry.
    assert run_name("train", None, ["model.lr=0.00123456789", "seed=1", "seed=2", "~callbacks.plots"]) == (
        "train lr=0.001235 seed=2 ~plots"
    )


def test_flat_params_are_typed_with_group_choices_apart():
    overrides = ["data=synthetic", "model.lr=1e-3", "data.clahe=true", "data.synthetic_size=[96,96]", "data.root=/x"]
    assert flat_params(overrides, groups=["data", "model", "experiment"]) == {
        "choices/data": "synthetic",
        "lr": 0.001,
        "clahe": True,
        "synthetic_size": [96, 96],
    }


def test_sweep_group_is_the_study_kept_in_a_storage_else_the_sweep_directory():
    assert sweep_group("outputs/train/multiruns/2025-01-02_03-04-05-000006") == "2025-01-02_03-04-05-000006"
    assert sweep_group("outputs/x/sweep", study_name="retinaseg", storage=None) == "sweep"
    assert sweep_group("outputs/x/sweep", study_name="retinaseg", storage="sqlite:///optuna.db") == "retinaseg"


@pytest.fixture
def hydra_job():
    """Makes this process look like a Hydra job composed from conf/train.yaml with the given overrides."""

    def job(overrides: list[str]):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            HydraConfig.instance().set_config(compose("train", overrides=overrides, return_hydra_config=True))

    yield job
    HydraConfig.instance().cfg = None


def test_hydra_identity_groups_a_plain_run_by_experiment_and_a_multirun_by_its_sweep(hydra_job):
    assert hydra_identity("train") is None  # outside a Hydra app

    hydra_job(["experiment=drive_cpu", "model.lr=0.1"])
    plain = hydra_identity("train")
    assert (plain.name, plain.group) == ("drive_cpu lr=0.1", "drive_cpu")
    assert plain.params == {"choices/experiment": "drive_cpu", "lr": 0.1}

    hydra_job(["model.lr=0.1", "hydra.mode=MULTIRUN", "hydra.sweep.dir=/runs/sweep1"])
    assert (hydra_identity("train").name, hydra_identity("train").group) == ("train lr=0.1", "sweep1")
    study = ["hparams_search=optuna", "hydra.mode=MULTIRUN", "hydra.sweep.dir=/runs/sweep1"]
    hydra_job(study + ["hydra.sweeper.storage=sqlite:///optuna.db", "hydra.sweeper.study_name=widths"])
    assert hydra_identity("train").group == "widths"


def test_flat_numbers_keeps_numbers_and_intervals():
    metrics = {
        "f1": 0.8,
        "n_images": 20,
        "tta": True,
        "split": "test",
        "per_image_mean": {"f1": 0.79},
        "ci95": {"f1": [0.78, 0.82]},
        "second_observer": {"f1": 0.79, "whole_image": {"f1": 0.7}},
    }
    assert flat_numbers(metrics, "test") == {
        "test/f1": 0.8,
        "test/n_images": 20,
        "test/per_image_mean/f1": 0.79,
        "test/ci95/f1/lo": 0.78,
        "test/ci95/f1/hi": 0.82,
        "test/second_observer/f1": 0.79,
        "test/second_observer/whole_image/f1": 0.7,
    }


class FakeLogger:
    """Stands for a W&B logger whose run is in `mode`; records the artifacts it is asked to use."""

    def __init__(self, mode: str, error: Exception | None = None):
        self.experiment = type("Run", (), {"settings": type("Settings", (), {"mode": mode})()})()
        self.used, self.error = [], error

    def use_artifact(self, artifact: str, artifact_type: str | None = None):
        if self.error:
            raise self.error
        self.used.append((artifact, artifact_type))


def test_training_artifact_is_declared_as_input_online_only(caplog):
    for mode in ("offline", "dryrun", "disabled"):
        logger = FakeLogger(mode)
        use_training_artifact(logger, "abc123")
        assert logger.used == []
    online = FakeLogger("online")
    use_training_artifact(online, None)  # a checkpoint trained without W&B
    use_training_artifact(online, "abc123")
    assert online.used == [("model-abc123:best", "model")]
    # Not uploaded (its training ran offline): a warning, and the evaluation goes on.
    with caplog.at_level(logging.WARNING):
        use_training_artifact(FakeLogger("online", error=ValueError("artifact not found")), "abc123")
    assert "not declared as input: artifact not found" in caplog.text


# Real runs, offline.


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The run directory of a tiny training (RUN: experiment=drive_cpu, 2 epochs) logged offline to W&B."""
    tmp = tmp_path_factory.mktemp("wandb_training")
    run_dir = tmp / "run"
    result = run_module(RUN + [f"hydra.run.dir={run_dir}"], cwd=tmp, **OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_training_run_is_named_grouped_and_summarised(trained):
    (run,) = wandb_runs(trained)
    assert run.run.display_name == RUN_NAME
    assert (run.run.run_group, run.run.job_type, run.run.project) == ("drive_cpu", "train", "retinaseg")
    assert "drive_cpu" in run.run.tags
    # The composed config, and the overrides flat.
    assert run.config["model"]["base_channels"] == 4 and run.config["data"]["dataset"] == "synthetic"
    assert (run.config["lr"], run.config["max_epochs"], run.config["choices/data"]) == (0.01, 2, "synthetic")
    parameters = sum(p.numel() for p in VesselSegmentationModule(base_channels=4, depth=2).parameters())
    assert run.config["parameters"] == parameters

    # The best val/f1 by W&B's own summary of the metric, and its epoch.
    (definition,) = [r.metric for r in run.records if r.HasField("metric") and r.metric.name == "val/f1"]
    assert definition.summary.max
    val = [row for row in run.history if "val/f1" in row]
    best = max(row["val/f1"] for row in val)
    assert len(val) == 2 and run.summary["val/f1"] == {"max": best}
    best_epoch = next(row["epoch"] for row in val if row["val/f1"] == best)
    assert run.summary["best_epoch"] == best_epoch
    # drive_cpu tests its final weights, whatever the best val/f1: best.ckpt holds the last epoch.
    best_ckpt = trained / "checkpoints" / "best.ckpt"
    assert torch.load(best_ckpt, weights_only=True)["epoch"] == 1
    # test/*: the tested checkpoint's, as in metrics.json.
    metrics = json.loads((trained / "metrics.json").read_text())
    logged = [key for key in REPORTED if key != "sensitivity"]  # training logs it as recall only
    assert {key: run.summary[f"test/{key}"] for key in logged} == {key: metrics[key] for key in logged}
    # The model, the machine, the speed, the code.
    assert run.summary["parameters"] == parameters and run.summary["precision"] == "32-true"
    assert re.fullmatch(r".+ \(.*\), \d+ threads", run.summary["device"])
    assert run.summary["train/patches_per_s"] > 0 and run.summary["wall_time_s"] > 0
    # Every planned step was trained (a run cut short names its cause in train/stopped_by).
    assert run.summary["train/steps"] == run.summary["train/planned_steps"] > 0
    assert run.summary.get("train/stopped_by") is None
    assert (
        re.fullmatch(r"[0-9a-f]{40}", run.summary["git_commit"])
        and run.config["git_commit"] == run.summary["git_commit"]
    )

    # Its checkpoints say which W&B run and group wrote them.
    checkpoint = load_checkpoint(best_ckpt)
    assert (checkpoint.wandb_run_id, checkpoint.wandb_group) == (run.run.run_id, "drive_cpu")


@pytest.mark.slow
def test_training_run_holds_metrics_and_images(trained):
    (run,) = wandb_runs(trained)
    val_rows = [row for row in run.history if "val/f1" in row]
    with open(trained / "csv" / "metrics.csv") as file:
        csv_val = next(row for row in csv.DictReader(file) if row.get("val/f1"))
    assert all(val_rows[0][key] == float(value) for key, value in csv_val.items() if key.startswith("val/"))

    # One image per validation epoch (the sanity check logs none), with the validation image's true vessels.
    images = [row for row in run.history if "val/predictions/filenames" in row]
    assert len(images) == 2
    datamodule = FundusDataModule(
        dataset="synthetic", synthetic_images=4, synthetic_size=(96, 96), val_images=1, seed=42
    )
    datamodule.setup("fit")
    for row in images:
        assert row["val/predictions/captions"] == [datamodule.val_samples[0].id]
        assert Image.open(run.files / row["val/predictions/filenames"][0]).size == (96, 96)
        masks = row["val/predictions/all_masks"][0]
        truth = np.array(Image.open(run.files / masks["ground_truth"]["path"]))
        np.testing.assert_array_equal(truth, datamodule.val_samples[0].label)
        predicted = np.array(Image.open(run.files / masks["prediction"]["path"]))
        assert set(np.unique(predicted)) <= {0, 1} and not predicted[~datamodule.val_samples[0].fov].any()

    sync = re.search(r"upload it with: wandb sync (\S+)", (trained / "train.log").read_text())
    assert sync and Path(sync.group(1)) == run.path.parent


@pytest.mark.slow
def test_resumed_training_continues_its_wandb_run(trained, tmp_path):
    resumed = tmp_path / "resumed"
    result = run_module(
        RUN
        + [f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=3", f"hydra.run.dir={resumed}"],
        cwd=tmp_path,
        **OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ((first,), (second,)) = wandb_runs(trained), wandb_runs(resumed)
    assert second.run.run_id == first.run.run_id and second.run.run_group == "drive_cpu"


@pytest.mark.slow
def test_evaluation_joins_its_training_run(trained, tmp_path):
    eval_dir = tmp_path / "eval"
    ckpt = trained / "checkpoints" / "best.ckpt"
    result = run_entry_point(
        "eval", [f"ckpt_path={ckpt}", "logger=wandb", "threshold=0.4", f"hydra.run.dir={eval_dir}"], tmp_path, **OFFLINE
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ((training,), (run,)) = wandb_runs(trained), wandb_runs(eval_dir)
    assert (run.run.display_name, run.run.job_type) == ("eval threshold=0.4", "eval")
    assert run.run.run_group == training.run.run_group == "drive_cpu"
    assert run.config["training_run_id"] == training.run.run_id
    assert run.config["checkpoint"] == str(ckpt) and run.config["model"]["base_channels"] == 4

    # Every number of metrics.json, under the split.
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert all(run.summary[f"test/{key}"] == metrics[key] for key in (*REPORTED, "threshold", "n_images"))
    assert all(run.summary[f"test/per_image_mean/{key}"] == metrics["per_image_mean"][key] for key in REPORTED)
    assert run.summary["parameters"] == training.summary["parameters"]
    assert run.summary["device"] and run.summary["git_commit"] == training.summary["git_commit"]
    # The per-image rows as a table, as in per_image.csv.
    table = json.loads((run.files / run.summary["test/per_image/path"]).read_text())
    with open(eval_dir / "per_image.csv") as file:
        rows = list(csv.DictReader(file))
    assert table["columns"] == list(rows[0])
    assert [row[0] for row in table["data"]] == [row["id"] for row in rows]
    assert all(
        math.isclose(value, float(row[key]))
        for line, row in zip(table["data"], rows)
        for key, value in zip(rows[0], line)
        if key != "id"
    )
    # ROC/PR and the prediction grid; the first 4 test images with their true and predicted vessels.
    assert run.summary["plots/roc_pr/filenames"] and run.summary["plots/predictions/filenames"]
    assert run.summary["test/predictions/captions"] == [row["id"] for row in rows[:4]]
    # Offline, no artifact is looked up.
    assert not any(r.HasField("use_artifact") for r in run.records)


@pytest.mark.slow
def test_benchmark_is_a_run_of_its_own_job_type(tmp_path):
    overrides = [o for o in TINY_SYNTHETIC if not o.startswith("trainer.")]
    args = overrides + [
        "steps=1",
        "warmup_steps=1",
        "rounds=1",
        "inference_images=1",
        "precisions=[32-true]",
        "channels_last=[false]",
        "compile=[false]",
        "inference_modes=[whole]",
        "logger=wandb",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run_entry_point("benchmark", args, tmp_path, **OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = wandb_runs(tmp_path / "run")
    assert run.run.job_type == "benchmark" and run.run.display_name.startswith("benchmark base_channels=4 depth=2")
    benchmark = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    assert run.summary["train/lightning/32-true/patches_per_s"] == benchmark["training"][1]["patches_per_s"]
    assert run.summary["inference/whole/seconds_per_image"] == benchmark["inference"][0]["seconds_per_image"]
    assert run.summary["training/_type"] == run.summary["inference/_type"] == "table-file"


# The mode.


def wandb_env(tmp_path: Path, **extra) -> dict:
    """The environment without any W&B mode or credentials: no key, empty W&B settings, no .netrc."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "NETRC": str(tmp_path / "no-netrc"), **extra}


def test_mode_comes_from_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_config("train", ["logger=wandb"], tmp_path).logger.wandb.mode == "disabled"


@pytest.mark.slow
def test_without_api_key_mode_is_offline_and_no_network_is_touched(tmp_path):
    # Python's audit hooks see every connection, name lookup, datagram and child process this process attempts.
    code = (
        "import sys\n"
        "from retinaseg.tracking.wandb import resolve_mode\n"
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


@pytest.mark.slow
def test_unreachable_server_falls_back_to_offline_within_the_timeout(tmp_path):
    with socket.socket() as probe:  # a local port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from retinaseg.tracking.wandb import WandbLogger, finishing_wandb_run\n"
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
