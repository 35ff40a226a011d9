"""Figures: training curves and the prediction grid of a real (tiny) training, error map colours, logging images."""

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_SYNTHETIC, compose_config
from retinaseg import plots
from retinaseg.train import train


@pytest.mark.slow
def test_training_draws_curves_and_test_predictions(tmp_path):
    cfg = compose_config("train", TINY_SYNTHETIC + ["trainer.max_epochs=2", "callbacks.plots.num_images=2"], tmp_path)
    train(cfg)
    for name in ("curves.png", "predictions.png"):
        image = np.array(Image.open(tmp_path / "plots" / name).convert("RGB"))
        assert min(image.shape[:2]) > 400 and image.std() > 10, name  # a drawn figure, not a blank canvas


def test_epoch_values_take_each_epochs_last_logged_value(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss_step,train/loss_epoch,val/f1\n"
        "0,9,0.9,,\n0,9,,,0.5\n0,9,,0.8,\n1,19,0.7,,\n1,19,,,0.6\n1,19,,0.65,\n,20,,,\n"
    )
    values = plots.epoch_values(tmp_path / "metrics.csv")
    assert values["train/loss_epoch"] == {0: 0.8, 1: 0.65} and values["val/f1"] == {0: 0.5, 1: 0.6}


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
