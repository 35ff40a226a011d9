"""Progress where stdout is not a terminal: log lines from eval's and predict's image loops and from training."""

import logging
from types import SimpleNamespace

import torch
from lightning.pytorch.callbacks import EarlyStopping

from retinaseg.core import progress
from retinaseg.runs.callbacks import LogProgress, stop_cause


def test_duration_reads_as_a_progress_bar_shows_it():
    assert progress.duration(65) == "1:05" and progress.duration(3725) == "1:02:05"


def test_a_loop_logs_its_progress_where_stdout_is_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="retinaseg.core.progress"):
        assert list(progress.tracked(["a", "b", "c"], "predicting test images", interval_s=0)) == ["a", "b", "c"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("predicting test images: 3/3 images, ")
    assert lines[0].endswith(" left") and "images/s" in lines[0]


def test_a_loop_logs_at_its_end_and_not_before_its_interval(monkeypatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="retinaseg.core.progress"):
        list(progress.tracked(range(5), "segmenting", unit="photographs", interval_s=3600))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["segmenting: 5/5 photographs"]


def test_training_logs_step_epoch_loss_rate_and_time_left(monkeypatch, caplog):
    monkeypatch.setattr("retinaseg.runs.callbacks.on_terminal", lambda: False)
    trainer = SimpleNamespace(is_global_zero=True, estimated_stepping_batches=40, global_step=0, current_epoch=0)
    callback = LogProgress(interval_s=0)
    callback.on_train_start(trainer, None)
    trainer.global_step, trainer.current_epoch = 12, 1
    with caplog.at_level(logging.INFO, logger="retinaseg.runs.callbacks"):
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.4321)}, None, 0)
    (line,) = [r.getMessage() for r in caplog.records]
    assert (
        line.startswith("training: 12/40 steps, ") and " steps/s, " in line and line.endswith("; epoch 1, loss 0.4321")
    )


def test_training_on_a_terminal_leaves_progress_to_the_bar(monkeypatch, caplog):
    monkeypatch.setattr("retinaseg.runs.callbacks.on_terminal", lambda: True)
    trainer = SimpleNamespace(is_global_zero=True, estimated_stepping_batches=40, global_step=0, current_epoch=0)
    callback = LogProgress(interval_s=0)
    callback.on_train_start(trainer, None)
    with caplog.at_level(logging.INFO, logger="retinaseg.runs.callbacks"):
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)
    assert not caplog.records


def test_early_stopping_is_named_as_the_cause_of_a_short_run():
    stopping = EarlyStopping(monitor="val/f1", mode="max")
    stopping.stopped_epoch = 3
    assert stop_cause(SimpleNamespace(callbacks=[stopping])) == "early stopping on val/f1 at epoch 3"
    assert "trainer.should_stop" in stop_cause(SimpleNamespace(callbacks=[]))
