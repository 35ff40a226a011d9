"""Figures: training curves and the prediction grid of a real (tiny) training, error map colours, logging images."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.evaluation import plots
from retinaseg.train import train


@pytest.mark.slow
def test_training_draws_curves_and_test_predictions(tmp_path):
    cfg = compose_config("train", TINY_SYNTHETIC + ["trainer.max_epochs=2", "callbacks.plots.num_images=2"], tmp_path)
    train(cfg)
    for name in ("curves.png", "predictions.png"):
        image = np.array(Image.open(tmp_path / "plots" / name).convert("RGB"))
        assert min(image.shape[:2]) > 400 and image.std() > 10, name  # a drawn figure, not a blank canvas


def test_logged_values_by_step_with_each_epochs_end(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss_step,train/loss_epoch,val/f1,test/f1\n"
        "0,4,0.95,,,\n0,9,0.9,,,\n0,9,,,0.5,\n0,9,,0.8,,\n1,19,0.7,,,\n1,19,,,0.6,\n1,19,,0.65,,\n2,20,,,,0.7\n,20,,,,\n"
    )
    logged = plots.logged_values(tmp_path / "metrics.csv")
    assert logged.values["train/loss_epoch"] == {9: 0.8, 19: 0.65} and logged.values["val/f1"] == {9: 0.5, 19: 0.6}
    assert logged.values["train/loss_step"] == {4: 0.95, 9: 0.9, 19: 0.7}
    assert logged.epoch_ends == {0: 9, 1: 19}  # not the test's row


def test_error_map_colours_each_outcome():
    label = np.array([[1, 1, 0, 0, 1]], bool)
    prediction = np.array([[1, 0, 1, 0, 1]], bool)
    fov = np.array([[1, 1, 1, 1, 0]], bool)
    colours = [tuple(c) for c in plots.error_map(prediction, label, fov)[0]]
    assert colours == [plots.TP_COLOUR, plots.FN_COLOUR, plots.FP_COLOUR, (0, 0, 0), plots.OUTSIDE_FOV]


class ImageLogger:
    """A logger that takes images, as W&B's does."""

    def __init__(self):
        self.logged = []

    def log_image(self, key, images, step=None):
        self.logged.append((key, images))


def test_figures_go_to_loggers_that_take_images(tmp_path):
    taker = ImageLogger()
    plots.log_images([object(), taker], {"plots/curves": tmp_path / "curves.png"})
    assert taker.logged == [("plots/curves", [str(tmp_path / "curves.png")])]


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions draw, instead of their files."""
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    return figures


def test_roc_has_a_logarithmic_false_positive_axis(drawn):
    labels = torch.arange(1000) % 7 == 0
    probs = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.5 + labels * 0.4
    plots.roc_pr_curves(probs, labels, 0.9, {}, "roc.png", "title")
    roc = drawn[0].axes[0]
    assert roc.get_xscale() == "log" and roc.get_xlim()[0] == pytest.approx(1 / (1000 - int(labels.sum())))


def test_the_prediction_grid_title_states_threshold_binarisation_and_tta(drawn):
    row = {"id": "x", "image": np.zeros((8, 8, 3), np.uint8), "label": np.eye(8), "fov": np.ones((8, 8))}
    plots.results_grid([{**row, "prob": np.eye(8) * 0.9}], 0.42, "grid.png", tta=True)
    plots.results_grid([{**row, "prob": np.eye(8) * 0.9}], 0.5, "grid.png")
    assert "probability > 0.42 inside the FOV (flip TTA)" in drawn[0].get_suptitle()
    assert "probability > 0.5 inside the FOV (no TTA)" in drawn[1].get_suptitle()


def test_curves_are_drawn_by_step_with_epoch_ends_on_top(tmp_path, drawn):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss_step,train/loss_epoch,val/f1\n0,4,0.9,,\n0,7,,0.8,0.5\n1,9,0.7,,\n1,15,,0.6,0.6\n"
    )
    plots.training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    loss, *_, f1 = drawn[0].axes[:4]
    assert loss.get_xlabel() == "optimizer steps"
    assert [list(line.get_xdata()) for line in loss.get_lines()] == [[5, 10], [8, 16]]  # every few steps, epochs
    assert [list(line.get_xdata()) for line in f1.get_lines()] == [[8, 16]]
    (top,) = [ax for ax in f1.child_axes]
    assert list(top.get_xticks()) == [8, 16] and [t.get_text() for t in top.get_xticklabels()] == ["1", "2"]
