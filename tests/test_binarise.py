"""retinaseg.inference.binarise: hysteresis, bridging and small-component removal on hand-made probability maps, their
choice on validation images, and the same masks from eval, predict and training's metrics."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.configs import compose_config
from helpers.datasets import link_drive
from retinaseg.core.errors import ConfigError
from retinaseg.data.sample import Sample
from retinaseg.eval import evaluate
from retinaseg.evaluation.comparison import describe_binarisation
from retinaseg.evaluation.directory import EvaluationSettings
from retinaseg.evaluation.scoring import count_images
from retinaseg.evaluation.thresholds import best_binarisation
from retinaseg.inference.binarise import Binarisation, binarise
from retinaseg.model.metrics import FOVMetrics
from retinaseg.model.module import VesselSegmentationModule
from retinaseg.predict import predict


def hand_made() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A 40x40 probability map and FOV (all but the last 4 columns), with its parts by name:
    trunk: a sure vessel (0.9), 30 pixels; branch: a faint vessel (0.33), 8 pixels, touching the trunk at a corner
    only; island: a faint blob (0.33) on its own; speck: a sure 2x2 blob (0.9) on its own; outside: a sure blob beyond the FOV.
    """
    prob = np.full((40, 40), 0.05, np.float32)
    parts = {name: np.zeros((40, 40), bool) for name in ("trunk", "branch", "island", "speck", "outside")}
    parts["trunk"][5, 2:32] = True
    for i in range(8):  # a diagonal from (6, 32): 8-connected to the trunk's end (5, 31) only
        parts["branch"][6 + i, 32 + i // 4] = True
    parts["island"][20:23, 5:10] = True
    parts["speck"][30:32, 20:22] = True
    parts["outside"][10:20, 37:39] = True
    for name, value in (("trunk", 0.9), ("branch", 0.33), ("island", 0.33), ("speck", 0.9), ("outside", 0.9)):
        prob[parts[name]] = value
    fov = np.ones((40, 40), bool)
    fov[:, 36:] = False
    return prob, fov, parts


def union(parts: dict[str, np.ndarray], *names: str) -> np.ndarray:
    return np.logical_or.reduce([parts[name] for name in names])


def test_each_option_removes_exactly_what_it_should():
    prob, fov, parts = hand_made()
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5)), union(parts, "trunk", "speck"))
    # Hysteresis at 0.6 x 0.5 = 0.3: the faint branch joins the trunk; the faint island, connected to nothing sure, stays out.
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5, 0.6)), union(parts, "trunk", "branch", "speck"))
    # A lower threshold above the faint pixels adds nothing.
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5, 0.9)), union(parts, "trunk", "speck"))
    # min_size 5 drops the 4-pixel speck, min_size 4 keeps it; the FOV's outside never counts.
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5, None, 5)), parts["trunk"])
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5, None, 4)), union(parts, "trunk", "speck"))
    # Both: the branch joins the trunk before small components go; 31 pixels keep the trunk only with its branch.
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5, 0.6, 31)), union(parts, "trunk", "branch"))
    assert not binarise(prob, fov, Binarisation(0.5, None, 31)).any()


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="model.hysteresis"):
        Binarisation.checked(0.5, 0.0, 0, prefix="model.")
    with pytest.raises(ConfigError, match="min_size"):
        Binarisation.checked(0.5, None, -1)
    with pytest.raises(ConfigError, match="model.bridge must be a number >= 0"):
        Binarisation.checked(0.5, None, 50, -1, prefix="model.")
    # A bridge joins components smaller than min_size: with none, it would silently do nothing.
    with pytest.raises(ConfigError, match="model.min_size is 0: set model.min_size too"):
        Binarisation.checked(0.5, None, 0, 4, prefix="model.")


def broken_vessel() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A 30x40 probability map with its parts by name, on a background of 0 (each pixel costs 1 to cross):
    trunk: a sure vessel (0.9), 15 pixels; gap1: 3 faint pixels (0.3) in line with it; first: a sure fragment of 6
    pixels beyond them; gap2: 3 more faint pixels; second: a sure fragment of 6 beyond those; speck: a sure 2x2 blob
    far from everything."""
    prob = np.zeros((30, 40), np.float32)
    spans = {"trunk": (2, 17), "gap1": (17, 20), "first": (20, 26), "gap2": (26, 29), "second": (29, 35)}
    parts = {name: np.zeros((30, 40), bool) for name in (*spans, "speck")}
    for name, (start, stop) in spans.items():
        parts[name][10, start:stop] = True
    parts["speck"][25:27, 25:27] = True
    for name in parts:
        prob[parts[name]] = 0.3 if name.startswith("gap") else 0.9
    return prob, np.ones((30, 40), bool), parts


def test_bridge_joins_a_broken_vessel_along_its_faint_pixels_and_drops_a_speck():
    prob, fov, parts = broken_vessel()
    # min_size 10: the fragments (6) and the speck (4) are small; without a bridge they go.
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5, None, 10)), parts["trunk"])
    # The path from the trunk to the first fragment: half of 0.7 out of the trunk (which costs nothing), 0.7 twice,
    # half of 0.7 + 0.1 into the fragment: 2.15. A bridge of 2 is short of it.
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5, None, 10, 2.0)), parts["trunk"])
    # 2.2 joins the first fragment along exactly the faint pixels, then, in a second round, the second fragment
    # from the first (now part of the tree); the speck, 14 background pixels from anything, is still dropped.
    joined = union(parts, "trunk", "gap1", "first", "gap2", "second")
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5, None, 10, 2.2)), joined)
    # Without min_size dropping them, the speck and the fragments stay as components of their own.
    assert np.array_equal(binarise(prob, fov, Binarisation(0.5)), union(parts, "trunk", "first", "second", "speck"))
    # val: the smallest bridge of the candidates that joins both fragments (4), the same twice.
    sample = Sample("a", np.zeros((30, 40, 3), np.uint8), joined.astype(np.uint8), fov)
    first = best_binarisation({"a": prob}, [sample], 0.5, None, 10, "val")
    assert first == best_binarisation({"a": prob}, [sample], 0.5, None, 10, "val") == Binarisation(0.5, None, 10, 4)
    assert first.words() == "probability > 0.5, gaps bridged up to cost 4, components of >= 10 px"


def test_val_chooses_on_the_validation_images_and_the_same_twice():
    prob, fov, parts = hand_made()
    # The label: the trunk and its branch. Hysteresis brings the branch in, min_size drops the speck.
    sample = Sample("a", np.zeros((40, 40, 3), np.uint8), union(parts, "trunk", "branch").astype(np.uint8), fov)
    first = best_binarisation({"a": prob}, [sample], 0.5, "val", "val")
    assert first == best_binarisation({"a": prob}, [sample], 0.5, "val", "val")
    assert np.array_equal(binarise(prob, fov, first), union(parts, "trunk", "branch"))
    # The first of equal F1, the least change: the largest lower threshold that takes the branch (0.33 > 0.5 x 0.6),
    # the smallest size that drops the speck.
    assert (first.hysteresis, first.min_size) == (0.6, 10)
    # A fixed option stays as given.
    assert best_binarisation({"a": prob}, [sample], 0.5, None, "val") == Binarisation(0.5, None, 10)


def test_training_metrics_score_the_binarised_masks():
    prob, fov, parts = hand_made()
    label = union(parts, "trunk", "branch")
    settings = Binarisation(0.5, 0.6, 5)
    metrics = FOVMetrics(0.5)
    mask = torch.from_numpy(binarise(prob, fov, settings))[None, None]
    metrics.update(
        torch.from_numpy(prob)[None, None], torch.from_numpy(label)[None, None], torch.from_numpy(fov)[None, None], mask
    )
    values = metrics.compute()
    counted = count_images(["a"], [prob], [label.astype(np.uint8)], [fov], settings, with_histograms=False).total()
    assert float(values["f1"]) == pytest.approx(counted["f1"]) == 1.0
    # Without the options the speck and the missing branch cost F1.
    plain = count_images(["a"], [prob], [label.astype(np.uint8)], [fov], 0.5, with_histograms=False).total()
    assert plain["f1"] < 1.0


@pytest.mark.slow
def test_predict_and_eval_write_the_same_masks(drive_root, tmp_path):
    """The packaged model on one DRIVE test photograph, options chosen on the validation images by eval, the same
    numbers given to predict."""
    root = link_drive(drive_root, tmp_path / "DRIVE", "training", range(21, 41))
    link_drive(drive_root, root, "test", [1])
    overrides = ["ckpt_path=pretrained:drive", f"data.root={root}", "bootstrap=0", "plot_images=0"]
    # min_size and bridge given, hysteresis chosen: 9 candidates, each bridged on the 4 validation images.
    options = ["hysteresis=val", "min_size=50", "bridge=2"]
    metrics = evaluate(compose_config("eval", [*overrides, *options], tmp_path / "eval"))
    chosen = metrics["binarisation"]
    assert chosen["chosen_on_validation_images"] == ["hysteresis"] and (chosen["min_size"], chosen["bridge"]) == (50, 2)
    settings = [f"hysteresis={chosen['hysteresis']}", *options[1:]]
    predict(
        compose_config(
            "predict",
            [
                "ckpt_path=pretrained:drive",
                f"input={root / 'test' / 'images' / '01_test.tif'}",
                f"fov={root / 'test' / 'mask' / '01_test_mask.gif'}",
                f"output_dir={tmp_path / 'predict'}",
                *settings,
            ],
            tmp_path / "predict",
        )
    )
    evaluated = np.array(Image.open(tmp_path / "eval" / "predictions" / "01_test.png"))
    predicted = np.array(Image.open(tmp_path / "predict" / "01_test_mask.png"))
    assert np.array_equal(evaluated, predicted)
    # Not the plain threshold's mask: the options changed it.
    probs = np.load(tmp_path / "eval" / "probabilities.npz")["01_test"]
    fov = np.array(Image.open(root / "test" / "mask" / "01_test_mask.gif").convert("L")) > 0
    assert not np.array_equal(evaluated > 0, (probs > 0.5) & fov)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["binarisation"] == chosen
    # retinaseg.compare says how two evaluations binarised.
    assert describe_binarisation(EvaluationSettings.from_json(metrics)).endswith(
        "bridge 2, min_size 50; hysteresis chosen by validation F1"
    )
    assert describe_binarisation(EvaluationSettings(0.5, "fixed")) == "off"


def test_the_module_binarises_its_batches_as_eval_does():
    prob, fov, _ = hand_made()
    module = VesselSegmentationModule(base_channels=4, depth=2, hysteresis=0.6, min_size=5)
    probs, fovs = (torch.from_numpy(x)[None, None].repeat(2, 1, 1, 1) for x in (prob, fov))
    masks = module.predictor.masks(probs, fovs)
    assert masks.shape == (2, 1, 40, 40)
    assert np.array_equal(masks[1, 0].numpy(), binarise(prob, fov, Binarisation(0.5, 0.6, 5)))
