"""Files are written whole or not at all: a crash or a full disk leaves the previous file (or none), never a partial
one under a real name, and a full disk is one clear error."""

import errno
import os

import pytest
import torch
from PIL import Image

from helpers.checkpoints import write_checkpoint
from helpers.configs import TINY_SYNTHETIC, compose_config
from helpers.disk import fill_disk
from retinaseg.core.errors import ConfigError, DiskFullError
from retinaseg.core.safe_io import write_atomically
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.eval import evaluate
from retinaseg.predict import predict
from retinaseg.runs.metrics_csv import MetricsCSVLogger


def test_a_crash_halfway_through_a_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3}, path)
    pid = os.fork()
    if pid == 0:  # the child dies with half a checkpoint written
        write_atomically(path, lambda file: (file.write(b"half a checkpoint"), file.flush(), os._exit(9)))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert torch.load(path) == {"epoch": 3}


def test_a_failed_write_keeps_the_previous_file_and_says_why(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("{}")

    def fail_with(code):
        def write(file):
            file.write(b"{")
            raise OSError(code, os.strerror(code))

        return write

    with pytest.raises(DiskFullError, match=f"cannot write {path}: the disk is full"):
        write_atomically(path, fail_with(errno.ENOSPC))
    with pytest.raises(ConfigError, match=f"cannot write {path}: Permission denied"):
        write_atomically(path, fail_with(errno.EACCES))
    assert path.read_text() == "{}" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_read_only_filesystem_is_one_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # On a read-only filesystem the temporary file cannot be made, nor removed.
    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr("pathlib.Path.unlink", read_only)
    with pytest.raises(ConfigError, match="cannot write .*model.onnx: Read-only file system"):
        write_atomically(tmp_path / "model.onnx", lambda file: file.write(b"model"))


def test_a_full_disk_when_new_columns_appear_keeps_every_row_of_metrics_csv(small_disk):
    """Lightning's CSVLogger rewrites metrics.csv in place when a column appears (the test metrics at the end of a
    run): on a full disk the file was truncated and the training rows lost."""
    logger = MetricsCSVLogger(str(small_disk / "run"), flush_logs_every_n_steps=10**6)
    for step in range(3000):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "epoch": step // 100}, step)
    logger.save()
    before = logger.path.read_bytes()
    fill_disk(small_disk, left=0)
    # Two more columns: two more commas on each of 3000 rows, more than the page the file ends in can take.
    logger.log_metrics({"test/f1": 0.5, "test/auc": 0.9}, 3000)
    with pytest.raises(DiskFullError, match="metrics.csv: the disk is full"):
        logger.save()
    assert logger.path.read_bytes() == before
    assert [p.name for p in logger.path.parent.iterdir()] == ["metrics.csv"]


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "model.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path))


def test_a_full_disk_in_eval_is_one_error_and_leaves_no_partial_file(small_disk, checkpoint):
    run = small_disk / "eval"
    # Room for per_image.csv and histograms.npz, not the probability maps; metrics.json, written last, is missing:
    # the evaluation did not finish.
    fill_disk(small_disk, left=48 * 1024)
    with pytest.raises(DiskFullError, match="probabilities.npz: the disk is full"):
        evaluate(compose_config("eval", [f"ckpt_path={checkpoint}"], run))
    assert sorted(p.name for p in run.iterdir()) == ["histograms.npz", "per_image.csv"]


def test_a_full_disk_in_predict_is_one_error_and_leaves_no_partial_file(small_disk, checkpoint, tmp_path):
    photo = tmp_path / "eye.png"
    Image.fromarray(synthetic_samples(1, height=256, width=256)[0].image).save(photo)
    out = small_disk / "out"
    fill_disk(small_disk, left=4 * 1024)
    with pytest.raises(DiskFullError, match="eye_.*.png: the disk is full"):
        predict(compose_config("predict", [f"ckpt_path={checkpoint}", f"input={photo}", f"output_dir={out}"], out))
    assert not list(out.glob(".*.partial"))
    for written in out.glob("*.png"):  # those written before the disk filled up are whole
        Image.open(written).load()
