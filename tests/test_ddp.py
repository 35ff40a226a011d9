"""A real two-process DDP training on CPU (gloo), run as a Hydra multirun job: its pooled metrics equal a
single-process evaluation of the same checkpoint, and no process writes outside the job's directory."""

import csv
import json

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers.commands import run_module
from helpers.configs import TINY_SYNTHETIC
from retinaseg.evaluation.counts import REPORTED
from retinaseg.model.metrics import reported
from retinaseg.model.module import VesselSegmentationModule
from retinaseg.runs.rundir import RunDir

# Every test here trains.
pytestmark = pytest.mark.slow

# 5 test images are shared 3/2 between the processes; the 1 validation image is evaluated by both.
# Enough steps (8 per process and epoch) for predictions that are neither all background nor all vessel.
DDP = TINY_SYNTHETIC + [
    "trainer=ddp_cpu",
    "data.synthetic_images=5",
    "model.lr=0.01",
    "data.patches_per_epoch=128",
    "data.batch_size=8",
    "trainer.max_epochs=3",
]


def evaluate(stage: str, checkpoint, datamodule) -> dict[str, float]:
    model = VesselSegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (metrics,) = (trainer.validate if stage == "val" else trainer.test)(model, datamodule=datamodule)
    return reported(metrics, prefix=f"{stage}/")


def test_two_process_ddp_equals_single_process_evaluation(tmp_path):
    work, sweep = tmp_path / "work", tmp_path / "sweep"
    work.mkdir()
    result = run_module(["-m", f"hydra.sweep.dir={sweep}"] + DDP, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    job = sweep / "0"
    # Rank 1 ran this job only, in its directory (Lightning started it; it logged to its own file there).
    assert "Starting with 2 processes" in result.stdout + result.stderr and (job / "train_ddp_process_1.log").is_file()
    assert not any(work.iterdir()) and sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    datamodule = instantiate(OmegaConf.load(job / ".hydra" / "config.yaml").data, _convert_="all")
    best = job / "checkpoints" / "best.ckpt"
    test = evaluate("test", best, datamodule)
    ddp_test = json.loads((job / "metrics.json").read_text())
    assert all(0.0 < test[key] < 1.0 for key in ("recall", "specificity", "auc"))
    assert {key: ddp_test[key] for key in REPORTED} == pytest.approx(test, abs=1e-6)
    # The test images counted for cross-validation pooling: all 5, gathered from both processes.
    counts = RunDir(job).test_counts.read_counts("job")
    assert sorted(counts.ids) == sorted(datamodule.ids("test"))
    assert {key: counts.total()[key] for key in REPORTED} == pytest.approx(test, abs=1e-4)

    val = evaluate("val", best, datamodule)
    best_epoch = torch.load(best, map_location="cpu", weights_only=True)["epoch"]
    with open(job / "csv" / "metrics.csv") as file:
        ddp_val = next(row for row in csv.DictReader(file) if row.get("val/f1") and int(row["epoch"]) == best_epoch)
    assert reported(
        {key: float(value) for key, value in ddp_val.items() if key.startswith("val/")}, prefix="val/"
    ) == pytest.approx(val, abs=1e-6)
