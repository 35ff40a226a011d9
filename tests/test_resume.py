"""Interruption and resume: SIGKILL and SIGTERM at any stage, a moved run directory, NaN and full-disk stops,
the settings a continued run must keep, flat memory.

Each test inflicts the failure for real: a SIGKILL or SIGTERM to a training process, NaN weights, a full
filesystem. Those that train are marked slow.
"""

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from helpers.checkpoints import write_checkpoint
from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.core.errors import ConfigError, DataError, DiskFullError, DivergedError
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.model.module import VesselSegmentationModule
from retinaseg.runs.callbacks import exit_on_sigterm
from retinaseg.runs.resume import plan_start
from retinaseg.runs.rundir import RunDir
from retinaseg.train import train

slow = pytest.mark.slow

# Two short epochs of 8 batches, with a scheduler whose state a resume must restore, validated on 2 images.
RUN = TINY_SYNTHETIC + [
    "data.val_images=2",
    "trainer.max_epochs=2",
    "data.patches_per_epoch=128",
    "model.scheduler=cosine",
    "trainer.log_every_n_steps=2",
    "test=false",
    "callbacks.rich_progress_bar=null",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread per training, in this process and the ones it starts: the tiny model gains nothing
    from more, and on a busy machine they only contend. (The same in all, so results compare bitwise.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def read_text_or_empty(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def best_tracking(checkpoint: dict) -> dict:
    return next(state for key, state in checkpoint["callbacks"].items() if "'monitor': 'val/f1'" in key)


def assert_same_training(expected: dict, actual: dict) -> None:
    """Same epochs and steps, bit-identical weights, optimizer and scheduler state, same best checkpoint."""
    assert (actual["epoch"], actual["global_step"]) == (expected["epoch"], expected["global_step"]) == (1, 16)
    for name, weight in expected["state_dict"].items():
        assert torch.equal(weight, actual["state_dict"][name]), name
    for a, b in zip(expected["optimizer_states"][0]["state"].values(), actual["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert expected["lr_schedulers"] == actual["lr_schedulers"]
    assert best_tracking(expected)["best_model_score"] == best_tracking(actual)["best_model_score"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(compose_config("train", RUN, run_dir))
    return run_dir


@slow
def test_a_run_killed_mid_epoch_resumes_where_it_was_and_ends_as_if_never_killed(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # Data loader workers fetch ahead: the resumed run must still start from the right epoch's patches.
    command = [sys.executable, "-m", "retinaseg.train", *RUN, "data.num_workers=2"]
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a pipe could fill up and block the run
        process = subprocess.Popen(
            [*command, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
            env=ONE_THREAD,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.monotonic() + 300
        # Kill once epoch 0 is checkpointed and its training summary row is in the CSV: Lightning writes that
        # row a moment after last.ckpt, and a kill in between loses it (a known gap, see docs/troubleshooting.md).
        while (
            not (last.is_file() and "train/loss_epoch" in read_text_or_empty(run_dir / "csv" / "metrics.csv"))
            and process.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert load(last)["epoch"] == 0, "the run ended before it could be killed"

    # A new run is refused the killed run's directory, before anything in it is touched.
    record = {name: (run_dir / ".hydra" / name).read_bytes() for name in ("config.yaml", "overrides.yaml")}
    refused = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True
    )
    assert refused.returncode == 2 and f"resume={run_dir}" in refused.stderr and "Traceback" not in refused.stderr

    resumed = subprocess.run(
        [*command, f"resume={run_dir}"], cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The record of how the run was started is kept; the resume's own is beside it.
    assert {name: (run_dir / ".hydra" / name).read_bytes() for name in record} == record
    (resume_record,) = run_dir.glob(".hydra/resume-*/overrides.yaml")
    assert f"resume={run_dir}" in resume_record.read_text()
    assert_same_training(load(uninterrupted / "checkpoints" / "last.ckpt"), load(last))
    # The CSV log: each step and epoch once, no gap, the same values as the uninterrupted run's.
    rows = csv_rows(run_dir)
    assert [r["epoch"] for r in rows if "val/f1" in r] == ["0", "1"]
    assert rows == csv_rows(uninterrupted)


class SendSigterm(L.Callback):
    """Sends this process a SIGTERM, as a cluster scheduler does before pre-emption: after training step
    `after_step`, or after the first batch of the validation of epoch 1 or of the test (a copy of last.ckpt as
    it was before the test is kept as `<run dir>/last_before_test.ckpt`)."""

    def __init__(self, stage: str, after_step: int | None = None):
        self.after_step, self.stage = after_step, stage

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stage == "train" and trainer.global_step == self.after_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.stage == "validate" and not trainer.sanity_checking and trainer.current_epoch == 1 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_test_start(self, trainer, pl_module):
        run = RunDir(trainer.default_root_dir)
        shutil.copy(run.last, run.path / "last_before_test.ckpt")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.stage == "test" and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def sigterm(stage: str, after_step: int | None = None) -> list[str]:
    return ["+callbacks.sigterm._target_=test_resume.SendSigterm", f"+callbacks.sigterm.stage={stage}"] + (
        [f"+callbacks.sigterm.after_step={after_step}"] if after_step is not None else []
    )


@slow
def test_sigterm_saves_a_checkpoint_mid_epoch_that_resumes_exactly(uninterrupted, tmp_path):
    cfg = compose_config(
        "train",
        RUN + sigterm("train", after_step=12),
        tmp_path / "run",
    )
    with pytest.raises(SIGTERMException):
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = load(last)
    assert (saved["epoch"], saved["global_step"]) == (1, 12)  # 4 of epoch 1's 8 batches done
    assert saved["FundusDataModule"] == {"epoch": 1, "batches_done": 4}

    # The `ckpt_path=` form: training continues from the checkpoint in a new run directory.
    train(compose_config("train", RUN + [f"ckpt_path={last}"], tmp_path / "continued"))
    assert_same_training(
        load(uninterrupted / "checkpoints" / "last.ckpt"), load(tmp_path / "continued" / "checkpoints" / "last.ckpt")
    )
    assert min(int(r["step"]) for r in csv_rows(tmp_path / "continued")) >= 12


@slow
def test_sigterm_during_validation_then_resume_validates_that_epoch(uninterrupted, tmp_path):
    with pytest.raises(SIGTERMException):
        train(compose_config("train", RUN + sigterm("validate"), tmp_path))
    # Not saved mid-validation: last.ckpt is the end of epoch 0, and the resumed run repeats epoch 1 whole.
    assert load(tmp_path / "checkpoints" / "last.ckpt")["epoch"] == 0
    train(compose_config("train", RUN + [f"resume={tmp_path}"], tmp_path))
    rows = csv_rows(tmp_path)
    assert [r["epoch"] for r in rows if "val/f1" in r] == ["0", "1"]
    assert not [r for r in rows if "train/recall" in r and float(r["train/accuracy"]) == 0]  # no row of zeros
    assert rows == csv_rows(uninterrupted)
    assert_same_training(
        load(uninterrupted / "checkpoints" / "last.ckpt"), load(tmp_path / "checkpoints" / "last.ckpt")
    )


@slow
def test_sigterm_during_the_test_keeps_the_final_weights_in_last_ckpt(tmp_path):
    with pytest.raises(SIGTERMException):
        train(compose_config("train", RUN + ["test=true"] + sigterm("test"), tmp_path))
    # Testing loads the best weights: last.ckpt is not rewritten with them.
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == (tmp_path / "last_before_test.ckpt").read_bytes()


@slow
def test_a_moved_run_directory_keeps_its_best_checkpoint_tracking(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path / "copy")
    moved = (tmp_path / "copy").rename(tmp_path / "moved")
    best_before = best_tracking(load(moved / "checkpoints" / "best.ckpt"))["best_model_score"]
    train(compose_config("train", RUN + ["trainer.max_epochs=3", f"resume={moved}"], moved))
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    tracking = best_tracking(load(moved / "checkpoints" / "last.ckpt"))
    assert tracking["best_model_score"] >= best_before
    assert tracking["best_model_path"] == str(moved / "checkpoints" / "best.ckpt")


@slow
def test_two_runs_with_the_same_seed_give_the_same_metrics_on_cpu(uninterrupted, tmp_path):
    train(compose_config("train", RUN, tmp_path))
    assert csv_rows(tmp_path) == csv_rows(uninterrupted)
    assert_same_training(
        load(uninterrupted / "checkpoints" / "last.ckpt"), load(tmp_path / "checkpoints" / "last.ckpt")
    )


class PoisonWeights(L.Callback):
    """Turns a weight into NaN, as an overflowing update would: before the training batch at `step`,
    or (hook="validation") after the last batch of the epoch that reaches it, just before a checkpoint."""

    def __init__(self, step: int, hook: str):
        self.step, self.hook = step, hook

    def _poison(self, trainer, pl_module):
        if trainer.global_step == self.step:
            weight = next(pl_module.parameters())
            with torch.no_grad():
                weight[(0,) * weight.dim()] = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.hook == "batch":
            self._poison(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if self.hook == "validation":
            self._poison(trainer, pl_module)


@slow
@pytest.mark.parametrize(
    "hook, step, message",
    [
        ("batch", 10, r"the training loss is nan at step 10 \(epoch 1, batch 2\)"),
        ("validation", 16, r"weight \S+ is not finite at step 16 \(epoch 1\)"),
    ],
)
def test_nan_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, hook, step, message):
    overrides = [
        "+callbacks.poison._target_=test_resume.PoisonWeights",
        f"+callbacks.poison.step={step}",
        f"+callbacks.poison.hook={hook}",
    ]
    with pytest.raises(DivergedError, match=message) as error:
        train(compose_config("train", RUN + overrides, tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is {last}" in str(error.value)
    kept = load(last)
    assert kept["epoch"] == 0 and all(torch.isfinite(w).all() for w in kept["state_dict"].values())


@slow
def test_a_full_disk_stops_training_with_a_clear_error_and_keeps_the_checkpoints(small_disk):
    run_dir = small_disk / "run"
    overrides = [
        "+callbacks.fill._target_=test_resume.FillTheDisk",
        f"+callbacks.fill.path={small_disk / 'filler'}",
        "+callbacks.fill.left=8192",
    ]
    with pytest.raises(DiskFullError, match="cannot write .*: the disk is full"):
        train(compose_config("train", RUN + overrides, run_dir))
    assert load(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert load(run_dir / "checkpoints" / "best.ckpt")["epoch"] == 0
    assert not list(run_dir.rglob("*.partial"))


class FillTheDisk(L.Callback):
    """Fills the filesystem of the run directory at the start of the second epoch, leaving `left` bytes."""

    def __init__(self, path: str, left: int):
        self.path, self.left = Path(path), left

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            stat = os.statvfs(self.path.parent)
            self.path.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - self.left))


def test_a_continued_run_keeps_the_settings_that_give_it_its_meaning(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    write_checkpoint(run.last, compose_config("train", RUN, run.path))

    def start(*overrides: str):
        return plan_start(compose_config("train", RUN + [f"resume={run.path}", *overrides], run.path), run)

    assert start().ckpt_path == str(run.last)
    assert start("data.num_workers=2", "trainer.max_epochs=5").ckpt_path == str(run.last)  # speed and length: free
    with pytest.raises(
        ConfigError, match=r"saved with data.batch_size=16 \(this run: 8\), data.seed=42 \(this run: 1\)\."
    ):
        start("data.batch_size=8", "seed=1")
    with pytest.raises(ConfigError, match=r"data.dataset=synthetic \(this run: drive\).*resume_allow_changes=true"):
        start("data.dataset=drive")
    with caplog.at_level(logging.WARNING):
        assert start("data.batch_size=8", "resume_allow_changes=true").ckpt_path == str(run.last)
    assert "data.batch_size=16 (this run: 8)" in caplog.text
    with pytest.raises(ConfigError, match=r"model.base_channels=4 \(this run: 8\).*weights fit only"):
        start("model.base_channels=8", "resume_allow_changes=true")
    with pytest.raises(ConfigError, match="continues that run in its own directory"):
        plan_start(
            compose_config("train", RUN + [f"resume={run.path}"], tmp_path / "elsewhere"),
            RunDir(tmp_path / "elsewhere"),
        )
    with pytest.raises(DataError, match="missing.ckpt: no such file"):
        plan_start(
            compose_config("train", RUN + [f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "new"),
            RunDir(tmp_path / "new"),
        )


def test_a_sigterm_stop_exits_with_status_143_and_says_how_to_resume(tmp_path, caplog):
    for has_checkpoint, says in ((False, "nothing to resume"), (True, f"resume={tmp_path}")):
        if has_checkpoint:
            RunDir(tmp_path).checkpoints.mkdir()
            RunDir(tmp_path).last.write_bytes(b"")
        with pytest.raises(SystemExit) as stop, exit_on_sigterm(str(tmp_path)):
            raise SIGTERMException()
        assert stop.value.code == 143 and says in caplog.text


def process_tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and its children (data loader workers), from /proc."""
    rss = (
        int(
            next(
                line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS")
            ).split()[1]
        )
        * 1024
    )
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return rss + sum(process_tree_rss(int(child)) for child in children if Path(f"/proc/{child}").exists())


class RecordMemory(L.Callback):
    def __init__(self):
        self.rss = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.rss.append(process_tree_rss(os.getpid()))


@slow
def test_memory_stays_flat_over_epochs_with_several_workers():
    datamodule = FundusDataModule(
        dataset="synthetic",
        synthetic_images=4,
        synthetic_size=(96, 96),
        val_images=1,
        patch_size=32,
        patches_per_epoch=64,
        batch_size=16,
        num_workers=2,
    )
    memory = RecordMemory()
    trainer = L.Trainer(
        max_epochs=6,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[memory],
    )
    trainer.fit(VesselSegmentationModule(base_channels=4, depth=2), datamodule=datamodule)
    growth = max(memory.rss[2:]) - memory.rss[1]  # after the first epochs have allocated what they keep
    assert growth < 50 * 2**20, [f"{r / 2**20:.0f} MiB" for r in memory.rss]
