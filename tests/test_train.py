import json

import pytest

from helpers.commands import error_lines, run_module
from helpers.configs import TINY, TINY_SYNTHETIC, compose_config
from retinaseg.evaluation.counts import REPORTED
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
    overrides = [f"hydra.run.dir={run_dir}", "trainer.max_epochs=2", "callbacks.log_progress.interval_s=0"]
    result = run_module(TINY_SYNTHETIC + overrides, cwd=tmp_path)
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
    # How the test ran (eval's default is fp32), and that every planned step was trained.
    assert metrics["inference"]["precision"] == "32-true" and metrics["tta"] is False
    assert metrics["training"] == {"steps": 4, "planned_steps": 4, "stopped_by": None, "complete": True}
    # stdout is not a terminal here: progress goes to the log, a line per step at interval_s=0.
    log = (run_dir / "train.log").read_text()
    assert "training: 2/4 steps, " in log and "training: 4/4 steps, " in log and "; epoch 1, loss " in log
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
    assert str(missing) in result.stderr and "experiment=demo" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # Once: one line on stderr, nothing on stdout; reported before Lightning prints its banner. Caught before any
    # work began, the run leaves no directory that would block the corrected command.
    assert len(error_lines(result.stderr)) == 1
    assert str(missing) not in result.stdout
    assert "GPU available" not in result.stdout + result.stderr and "Seed set" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_the_demo_trains_tests_and_draws_its_plots(tmp_path):
    cfg = compose_config("train", ["experiment=demo"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dataset"] == "synthetic" and metrics["training"]["complete"]
    assert metrics["training"]["steps"] == 32
    assert (tmp_path / "plots" / "curves.png").is_file() and (tmp_path / "plots" / "predictions.png").is_file()
