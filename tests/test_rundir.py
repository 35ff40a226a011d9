"""Run directories: one run each, never one inside another, one process at a time; what a resume keeps; nothing
the user owns overwritten by eval or predict."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from helpers.checkpoints import write_checkpoint
from helpers.commands import error_lines, run_entry_point
from helpers.configs import CONF, TINY_SYNTHETIC, compose_config
from retinaseg.core import config
from retinaseg.core.errors import ConfigError
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.predict import predict
from retinaseg.runs.callbacks import CheckpointOnSigterm, RunCheckpoint
from retinaseg.runs.metrics_csv import MetricsCSVLogger
from retinaseg.runs.rundir import ClaimRunDirectory, RunDir, RunLock


def training_run(path) -> RunDir:
    """A directory as a training run leaves it (its config, overrides, a checkpoint, its metrics), without training."""
    run = RunDir(path)
    cfg = compose_config("train", TINY_SYNTHETIC, run.path)
    write_checkpoint(run.best, cfg)
    write_checkpoint(run.last, cfg)
    run.config.parent.mkdir()
    run.config.write_text(OmegaConf.to_yaml({**OmegaConf.to_container(cfg), "task_name": "train"}))
    (run.config.parent / "overrides.yaml").write_text("- model.base_channels=4\n")
    run.metrics.write_text('{"f1": 0.5}\n')
    return run


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_directory_holds_one_run(tmp_path):
    empty = RunDir(tmp_path / "new")
    empty.claim("train").release()
    assert not empty.lock.exists()

    run = training_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=f"already holds a train run .*Continue it with resume={run.path}"):
        run.claim("train")
    with pytest.raises(ConfigError, match="already holds a train run .*eval does not write over it"):
        run.claim("eval")
    with pytest.raises(ConfigError, match=f"{run.path / 'predictions'} is inside the train run {run.path}"):
        RunDir(run.path / "predictions").claim("predict")
    run.claim("train", resume=True).release()
    with pytest.raises(ConfigError, match="nothing to resume"):
        RunDir(tmp_path / "new").claim("train", resume=True)


def test_the_hydra_callback_refuses_in_one_line_with_exit_status_2(tmp_path, capsys):
    run = training_run(tmp_path / "run")
    for directory, resume, message in (
        (run.path, None, "already holds a train run"),
        (tmp_path / "empty", str(tmp_path / "empty"), "nothing to resume"),
    ):
        cfg = OmegaConf.create({"hydra": {"run": {"dir": str(directory)}}, "task_name": "train", "resume": resume})
        with pytest.raises(SystemExit) as stop:
            ClaimRunDirectory().on_run_start(cfg)
        assert stop.value.code == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert message in line


def test_two_runs_cannot_share_a_directory_at_once(tmp_path):
    run = RunDir(tmp_path / "run")
    lock = run.claim("train")
    with pytest.raises(ConfigError, match=r"is in use by process \d+ .*run.lock"):
        run.claim("train")
    lock.release()
    assert not run.lock.exists()
    # A lock left by a process that was killed is taken over.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    run.lock.write_text(f"{ended.pid} {socket.gethostname()}\n")
    run.claim("train").release()
    assert not run.lock.exists()


def test_a_resumed_run_records_its_config_beside_the_original(tmp_path):
    config.setup()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        new = compose("train", return_hydra_config=True).hydra
        resumed = compose("train", [f"resume={tmp_path}"], return_hydra_config=True).hydra
    assert new.output_subdir == ".hydra"
    assert resumed.run.dir == str(tmp_path) and resumed.output_subdir.startswith(".hydra/resume-")


def test_the_configs_write_where_run_dir_looks(tmp_path):
    cfg = compose_config("train", TINY_SYNTHETIC, tmp_path)
    run = RunDir(tmp_path)
    callbacks = config.instantiate_group(cfg.callbacks)
    saved = {c.filename: c.dirpath for c in callbacks if isinstance(c, RunCheckpoint)}
    assert saved == {"best": str(run.checkpoints), "last": str(run.checkpoints)}
    assert next(c for c in callbacks if isinstance(c, CheckpointOnSigterm)).last == run.last
    (logger,) = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    assert isinstance(logger, MetricsCSVLogger) and logger.path == run.metrics_csv


@pytest.mark.slow
def test_eval_never_writes_into_a_training_run(tmp_path):
    run = training_run(tmp_path / "run")
    before = snapshot(run.path)
    result = run_entry_point("eval", [f"ckpt_path={run.best}", f"hydra.run.dir={run.path}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "already holds a train run" in line and "Traceback" not in result.stderr
    assert snapshot(run.path) == before


@pytest.fixture
def photos(tmp_path):
    """A folder with one photograph, a folder with its FOV mask (named as predict names its output), a checkpoint."""
    sample = synthetic_samples(1, height=64, width=64)[0]
    (tmp_path / "photos").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(sample.image).save(tmp_path / "photos" / "eye.png")
    Image.fromarray(sample.fov.astype(np.uint8) * 255).save(tmp_path / "masks" / "eye_mask.png")
    ckpt = write_checkpoint(tmp_path / "model.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path))
    return tmp_path / "photos", tmp_path / "masks", ckpt


@pytest.mark.slow
def test_predict_never_writes_into_the_folders_it_reads(photos, tmp_path):
    folder, masks, ckpt = photos
    before = snapshot(masks)
    result = run_entry_point(
        "predict", [f"ckpt_path={ckpt}", f"input={folder}", f"fov={masks}", f"output_dir={masks}"], cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert f"output_dir={masks} is the folder of fov={masks}" in line and "Traceback" not in result.stderr
    assert snapshot(masks) == before  # no .hydra/, no predict.log, the mask as it was


def test_predict_never_overwrites_a_file_nor_reads_its_own_outputs(photos, tmp_path):
    folder, masks, ckpt = photos

    def run(**settings):
        overrides = [f"{k}={v}" for k, v in {"ckpt_path": ckpt, "input": folder, "fov": masks, **settings}.items()]
        return predict(compose_config("predict", overrides, tmp_path))

    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "eye_overlay.png").write_bytes(b"the user's own file")
    with pytest.raises(ConfigError, match="already holds eye_overlay.png, which predict would overwrite"):
        run(output_dir=tmp_path / "user")
    assert snapshot(tmp_path / "user") == {Path("eye_overlay.png"): b"the user's own file"}

    out = tmp_path / "out"
    assert run(output_dir=out) == [out / "eye_mask.png"]
    # An earlier run's output folder (Hydra leaves .hydra/config.yaml there) is not read as photographs.
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text("task_name: predict\n")
    with pytest.raises(ConfigError, match="is the output folder of an earlier predict run"):
        run(input=out, fov="null", output_dir=tmp_path / "again")


def sweep_config(sweep, task: str = "train") -> OmegaConf:
    """What ClaimRunDirectory reads of a multirun's config."""
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "task_name": task})


def test_a_multirun_claims_its_sweep_directory_as_a_run_claims_its_own(tmp_path, capsys):
    # An earlier sweep's directory: its jobs' records and results (a test=false sweep would have reported them).
    old = tmp_path / "old_sweep"
    job = RunDir(old / "0")
    job.config.parent.mkdir(parents=True)
    job.config.write_text("task_name: train\n")
    job.test_counts.histograms.write_bytes(b"the first sweep's counts")
    (old / "multirun.yaml").write_text("task_name: train\n")
    before = snapshot(old)
    run = training_run(tmp_path / "run")
    for sweep, message in (
        (old, "already holds a train run"),
        (run.path, "already holds a train run"),
        (run.path / "inside", "is inside the train run"),
    ):
        with pytest.raises(SystemExit) as stop:
            ClaimRunDirectory().on_multirun_start(sweep_config(sweep, "eval"))
        assert stop.value.code == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert message in line and "hydra.sweep.dir" in line
    assert snapshot(old) == before

    # One multirun at a time in a sweep directory.
    ClaimRunDirectory().on_multirun_start(sweep_config(tmp_path / "new"))
    with pytest.raises(SystemExit):
        ClaimRunDirectory().on_multirun_start(sweep_config(tmp_path / "new"))
    (line,) = error_lines(capsys.readouterr().err)
    assert "is in use by process" in line and "choose another hydra.sweep.dir" in line
    RunLock(RunDir(tmp_path / "new").lock).release()


@pytest.mark.slow
def test_eval_sweeps_never_write_over_a_run_nor_each_other(tmp_path):
    cfg = compose_config("train", TINY_SYNTHETIC, tmp_path)
    first, second = write_checkpoint(tmp_path / "a.ckpt", cfg), write_checkpoint(tmp_path / "b.ckpt", cfg)
    run = training_run(tmp_path / "run")
    before = snapshot(run.path)
    sweep = ["-m", f"ckpt_path={first}", "bootstrap=0", "plot_images=0"]
    into_run = run_entry_point("eval", [*sweep, f"hydra.sweep.dir={run.path}", "hydra.sweep.subdir=."], tmp_path)
    assert into_run.returncode == 2 and "Traceback" not in into_run.stderr, into_run.stderr[-3000:]
    (line,) = error_lines(into_run.stderr)
    assert "already holds a train run" in line
    assert snapshot(run.path) == before

    done = run_entry_point("eval", [*sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    kept = snapshot(tmp_path / "sweep")
    again = run_entry_point("eval", [*sweep, "threshold=0.3", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert again.returncode == 2 and "already holds an eval run" in error_lines(again.stderr)[0]
    assert snapshot(tmp_path / "sweep") == kept

    # Two jobs given one directory: the second is refused before it writes a result over the first's.
    shared = run_entry_point(
        "eval",
        ["-m", f"ckpt_path={first},{second}", "bootstrap=0", "plot_images=0", "hydra.sweep.subdir=.",
         f"hydra.sweep.dir={tmp_path / 'shared'}"],
        tmp_path,
    )  # fmt: skip
    assert shared.returncode == 2 and "Traceback" not in shared.stderr, shared.stderr[-3000:]
    (line,) = error_lines(shared.stderr)
    assert "already holds an earlier job's results" in line
    assert json.loads(RunDir(tmp_path / "shared").metrics.read_text())["checkpoint"] == str(first)
    assert not RunDir(tmp_path / "shared").lock.exists()


@pytest.mark.slow
def test_a_command_that_fails_before_working_leaves_nothing(photos, tmp_path):
    folder, masks, ckpt = photos
    args = [f"input={folder}", f"fov={masks}"]
    out = tmp_path / "out"
    failed = run_entry_point("predict", ["ckpt_path=missing.ckpt", *args, f"output_dir={out}"], tmp_path)
    assert failed.returncode == 2 and not out.exists(), failed.stderr[-3000:]
    # An existing folder keeps what it held, and nothing more.
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("the user's own file")
    failed = run_entry_point("predict", ["ckpt_path=missing.ckpt", *args, f"output_dir={tmp_path / 'user'}"], tmp_path)
    assert failed.returncode == 2 and snapshot(tmp_path / "user") == {Path("notes.txt"): b"the user's own file"}
    # The rerun, corrected, is not refused; a third into the same folder is, naming output_dir.
    assert run_entry_point("predict", [f"ckpt_path={ckpt}", *args, f"output_dir={out}"], tmp_path).returncode == 0
    again = run_entry_point("predict", [f"ckpt_path={ckpt}", *args, f"output_dir={out}"], tmp_path)
    (line,) = error_lines(again.stderr)
    assert "already holds a predict run" in line and "Choose another output_dir" in line
    # Other commands alike: a mistake in the settings leaves no run directory.
    failed = run_entry_point("eval", [f"ckpt_path={ckpt}", "bootstrap=2", f"hydra.run.dir={tmp_path / 'e'}"], tmp_path)
    assert failed.returncode == 2 and not (tmp_path / "e").exists(), failed.stderr[-3000:]
