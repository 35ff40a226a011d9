import json

import pytest

from helpers import TINY, TINY_SYNTHETIC, compose_config, run_module
from retinaseg.metrics import REPORTED
from retinaseg.train import train

# Every test here trains.
pytestmark = pytest.mark.slow


def test_tiny_training_on_drive(drive_root, tmp_path):
    cfg = compose_config(
        "train", TINY + [f"data.root={drive_root}", "model.base_channels=8", "model.depth=4"], tmp_path
    )
    value = train(cfg)
    assert 0.0 <= value <= 1.0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(REPORTED) <= set(metrics) and metrics["checkpoint"].endswith("best.ckpt")
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_entry_point_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_module(TINY_SYNTHETIC + [f"hydra.run.dir={run_dir}", "trainer.max_epochs=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in (
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        ".hydra/config.yaml",
        "train.log",
        "csv/metrics.csv",
        "metrics.json",
    ):
        assert (run_dir / path).is_file(), path
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(0.0 <= metrics[key] <= 1.0 for key in REPORTED)
    csv = (run_dir / "csv" / "metrics.csv").read_text()
    assert "val/f1" in csv and "train/loss_epoch" in csv and "test/auc" in csv


def test_debug_fast_runs_one_batch_of_each_stage(tmp_path):
    result = run_module(TINY_SYNTHETIC + ["debug=fast", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_missing_drive_is_one_clear_message(tmp_path):
    missing = tmp_path / "no-such-DRIVE"
    result = run_module(TINY + [f"data.root={missing}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "data=synthetic" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
