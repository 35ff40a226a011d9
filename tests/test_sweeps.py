"""Hydra multiruns: a directory per job inside one sweep directory, failing jobs reported, the best job named;
cross-validation folds pooled; an Optuna study of two trials; the SLURM launcher's config."""

import json
import re

import numpy as np
import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir

from helpers.commands import run_module
from helpers.configs import CONF, TINY_SYNTHETIC
from helpers.wandb_records import wandb_runs
from retinaseg.data.sources.synthetic import SyntheticCatalogue
from retinaseg.evaluation.counts import REPORTED
from retinaseg.evaluation.scoring import ImageCounts
from retinaseg.runs.rundir import RunDir
from retinaseg.runs.sweeps import EvalSweepSummary

# Microseconds in the name keep sweeps started in the same second apart.
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}")


def overrides(job_dir) -> list[str]:
    return yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())


@pytest.mark.slow
def test_multirun_runs_each_combination_in_its_own_directory(tmp_path):
    result = run_module(
        ["-m", "model.loss=dice,bce", "logger=wandb"] + TINY_SYNTHETIC, cwd=tmp_path, WANDB_MODE="offline"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    assert TIMESTAMP.fullmatch(sweep.name)
    for job, loss in ((0, "dice"), (1, "bce")):
        assert f"model.loss={loss}" in overrides(sweep / str(job))
        assert (sweep / str(job) / "metrics.json").is_file() and (sweep / str(job) / "csv" / "metrics.csv").is_file()
    # Each job is a W&B run of its own, finished before the next job starts, named by its overrides, in one group
    # named after the sweep, with its swept parameter flat in the config.
    runs = [wandb_runs(sweep / str(job)) for job in (0, 1)]
    assert [len(r) for r in runs] == [1, 1]
    (first,), (second,) = runs
    assert first.run.run_id != second.run.run_id
    common = "base_channels=4 depth=2 patch_size=32 patches_per_epoch=32 batch_size=16 max_epochs=1 precision=32-true"
    common += " data=synthetic synthetic_images=4 synthetic_size=[96,96] val_images=1"
    assert [r.run.display_name for r in (first, second)] == [f"train loss={loss} {common}" for loss in ("dice", "bce")]
    assert [r.config["loss"] for r in (first, second)] == ["dice", "bce"]
    assert first.run.run_group == second.run.run_group == sweep.name
    assert first.run.job_type == second.run.job_type == "train"

    summary = yaml.safe_load((sweep / "sweep_summary.yaml").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["COMPLETED", "COMPLETED"]
    values = [job["value"] for job in summary["jobs"]]
    assert all(0.0 <= v <= 1.0 for v in values)
    best = summary["best"]
    assert best["value"] == max(values) and best["dir"] == str(sweep / str(best["job"]))
    assert f"best job: #{best['job']}" in result.stdout + result.stderr


@pytest.mark.slow
def test_failing_jobs_are_reported_with_their_overrides_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_module(["-m", "data.eval_batch_size=0,-1", f"hydra.sweep.dir={sweep}"] + TINY_SYNTHETIC, cwd=tmp_path)
    assert result.returncode != 0
    logged = result.stdout + result.stderr
    for job, size in ((0, 0), (1, -1)):
        assert re.search(
            rf"job #{job} failed \(overrides: data\.eval_batch_size={size} .*\): ConfigError: data\.eval_batch_size must be an integer >= 1",
            logged,
        )
    summary = yaml.safe_load((sweep / "sweep_summary.yaml").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["FAILED", "FAILED"] and summary["best"] is None
    assert (
        "data.eval_batch_size=-1" in summary["jobs"][1]["overrides"]
        and "eval_batch_size" in summary["jobs"][1]["error"]
    )


@pytest.mark.slow
def test_optuna_study_of_two_trials_kept_in_its_storage(tmp_path):
    sweep, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'optuna.db'}"
    # TINY_SYNTHETIC fixes base channels, patch and batch size: the study searches lr, loss and CLAHE.
    args = [
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={sweep}",
    ]
    result = run_module(args + TINY_SYNTHETIC + ["logger=wandb"], cwd=tmp_path, WANDB_MODE="offline")
    assert result.returncode == 0, result.stderr[-3000:]

    # Both trials are W&B runs in the study's group, with the sampled parameters flat in their config.
    runs = wandb_runs(sweep)
    assert [r.run.run_group for r in runs] == ["retinaseg", "retinaseg"]
    assert all(
        {"lr", "loss", "clahe"} <= set(r.config) and f"lr={r.config['lr']:.4g}" in r.run.display_name for r in runs
    )
    trials = [dict(arg.split("=", 1) for arg in overrides(sweep / str(job))) for job in (0, 1)]
    assert all(
        {"model.lr", "model.loss", "data.clahe"} <= set(trial) and trial["model.base_channels"] == "4"
        for trial in trials
    )
    assert trials[0]["model.lr"] != trials[1]["model.lr"]

    study = optuna.load_study(study_name="retinaseg", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    summary = yaml.safe_load((sweep / "sweep_summary.yaml").read_text())
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert summary["best"]["value"] == results["best_value"] == study.best_value == max(t.value for t in study.trials)


def test_slurm_launcher_config_composes():
    # What `python -m retinaseg.train hydra/launcher=slurm ... --cfg hydra` prints, resolved.
    args = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=args, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # One SLURM task per GPU, on as many nodes as Lightning is told.
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.sync_batchnorm


@pytest.mark.slow
def test_cross_validation_sweep_pools_every_folds_test_images(tmp_path):
    sweep = tmp_path / "sweep"
    # 6 synthetic images (3 "train", 3 "test") pooled and cut into 2 folds of 3; 1 of each fold's 3 training
    # images validates.
    args = ["data.folds=2", "data.fold=0,1", "data.synthetic_images=3", f"hydra.sweep.dir={sweep}"]
    # Enough steps for predictions that are neither all background nor all vessel (as tests/test_ddp.py).
    steps = ["model.lr=0.01", "data.patches_per_epoch=128", "data.batch_size=8", "trainer.max_epochs=2"]
    result = run_module(["-m", *TINY_SYNTHETIC, *steps, *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = yaml.safe_load((sweep / "sweep_summary.yaml").read_text())
    (cv,) = summary["cross_validation"]
    assert cv["folds"] == 2 and cv["folds_done"] == [0, 1] and "data.fold=0" not in cv["overrides"]

    counts = [RunDir(sweep / str(job)).test_counts.read_counts("fold") for job in (0, 1)]
    folds = [json.loads((sweep / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    # Each fold's counts are its own test metrics' ...
    for c, metrics in zip(counts, folds, strict=True):
        assert 0 < metrics["f1"] < 1 and {k: c.total()[k] for k in REPORTED} == pytest.approx(
            {k: metrics[k] for k in REPORTED}, abs=1e-4
        )
    # ... and together the 6 images, each scored once, by the fold that did not train on it.
    images = SyntheticCatalogue(3, (96, 96), seed=42)
    assert sorted(counts[0].ids + counts[1].ids) == sorted(images.ids("all"))
    assert cv["pooled"] == pytest.approx(ImageCounts.concatenate(*counts).total())
    assert cv["mean"]["f1"] == pytest.approx(np.mean([m["f1"] for m in folds]))
    assert cv["sd"]["f1"] == pytest.approx(np.std([m["f1"] for m in folds], ddof=1))
    assert "cross-validation, folds [0, 1] of 2: pooled over their test pixels" in result.stdout + result.stderr


def test_an_eval_sweeps_table_lists_its_failed_jobs(tmp_path):
    for job, status in ((0, "COMPLETED"), (1, "FAILED")):
        run = RunDir(tmp_path / str(job))
        run.path.mkdir()
        record = {"job": job, "status": status, "overrides": [f"ckpt_path=m{job}.ckpt"], "dir": str(run.path)}
        if status == "FAILED":
            record["error"] = "DataError: m1.ckpt: no such file"
        run.job_record.write_text(yaml.safe_dump(record))
    RunDir(tmp_path / "0").metrics.write_text(json.dumps({"checkpoint": "m0.ckpt", "f1": 0.8}))
    EvalSweepSummary().write_summary(tmp_path, None)
    table = (tmp_path / "eval_summary.md").read_text()
    assert "| m0.ckpt |" in table
    assert "1 job(s) failed, not in the table:\n\n- #1 (ckpt_path=m1.ckpt): DataError: m1.ckpt: no such file" in table


@pytest.mark.slow
def test_a_failed_fold_leaves_the_others_pooled_in_the_log(tmp_path):
    sweep = tmp_path / "sweep"
    # Fold 5 of 2 fails as it starts; the sweep then ends with its error, the pooled result of fold 0 still logged.
    args = ["data.folds=2", "data.fold=0,5", "data.synthetic_images=3", f"hydra.sweep.dir={sweep}"]
    result = run_module(["-m", *TINY_SYNTHETIC, *args], cwd=tmp_path)
    assert result.returncode != 0
    logged = result.stdout + result.stderr
    assert "job #1 failed" in logged and "cross-validation, folds [0] of 2: pooled over their test pixels" in logged
