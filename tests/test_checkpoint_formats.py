"""Model files other than a current retinaseg checkpoint: checkpoints from before the decoder's `up_conv` kept
the original's name, and the original notebook's plain state_dict."""

import logging
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.checkpoints import write_checkpoint
from helpers.commands import run_entry_point
from helpers.configs import TINY_SYNTHETIC, compose_config
from helpers.datasets import make_drive
from helpers.seed import seed_unet
from retinaseg.core.errors import DataError
from retinaseg.eval import evaluate
from retinaseg.model.checkpoint import load_checkpoint
from retinaseg.predict import predict
from retinaseg.train import train


def write_old_style(path):
    """Rewrite the retinaseg checkpoint at `path` as checkpoints were written before the decoder's `up_conv` kept
    the original's name (`d1.up.weight`) and before datasets were config groups (data settings `source: synthetic`,
    no dataset, scale, folds or fold)."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k.replace(".up_conv.", ".up."): v for k, v in checkpoint["state_dict"].items()}
    assert any(".up." in k for k in checkpoint["state_dict"])
    data = checkpoint["datamodule_hyper_parameters"]
    data["source"] = data.pop("dataset")
    for key in ("scale", "folds", "fold"):
        del data[key]
    torch.save(checkpoint, path)


@pytest.mark.slow
def test_old_checkpoints_keep_working_in_eval_predict_and_resume(tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(compose_config("train", TINY_SYNTHETIC + ["test=false"], run_dir))
    for name in ("best.ckpt", "last.ckpt"):
        write_old_style(run_dir / "checkpoints" / name)
    renamed = "renamed 4 decoder keys `up.*` to the original's `up_conv.*`"

    with caplog.at_level(logging.INFO):
        metrics = evaluate(
            compose_config("eval", [f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"], tmp_path / "eval")
        )
    assert 0 <= metrics["f1"] <= 1 and caplog.text.count(renamed) == 1
    assert metrics["dataset"] == "synthetic" and metrics["scale"] == 1 and metrics["n_images"] == 4

    caplog.clear()
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(photo)
    with caplog.at_level(logging.INFO):
        predict(
            compose_config(
                "predict",
                [
                    f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
                    f"input={photo}",
                    f"output_dir={tmp_path / 'out'}",
                ],
                tmp_path,
            )
        )
    assert (tmp_path / "out" / "photo_mask.png").is_file() and caplog.text.count(renamed) == 1

    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(
            compose_config(
                "train", TINY_SYNTHETIC + ["test=false", "trainer.max_epochs=2", f"resume={run_dir}"], run_dir
            )
        )
    assert renamed in caplog.text
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and "net.d1.up_conv.weight" in resumed["state_dict"]


@pytest.fixture
def notebook_weights(tmp_path):
    """What a user of the original notebook has: `torch.save(model.state_dict(), "unet.pth")`, here of an
    untrained `build_unet` with non-trivial BatchNorm statistics; and the network itself."""
    torch.manual_seed(0)
    network = seed_unet().build_unet()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(network.state_dict(), tmp_path / "unet.pth")
    return tmp_path / "unet.pth", network.eval()


def test_the_notebooks_state_dict_evaluates_with_its_own_preprocessing(notebook_weights, tmp_path):
    path, network = notebook_weights
    # Images of 48x48: a multiple of 16, where the original network needs no cropping.
    root = make_drive(tmp_path / "DRIVE", numbers=(1, 2), split="test", size=(48, 48))
    result = run_entry_point(
        "eval", [f"ckpt_path={path}", f"data.root={root}", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "eval" / "eval.log").read_text()
    assert "is a plain U-Net state_dict: read as the U-Net with in_channels=3, base_channels=64, depth=4" in log
    assert "threshold 0.5000" in result.stdout
    # The original's preprocessing: RGB scaled to [0, 1], nothing else.
    probabilities = np.load(tmp_path / "eval" / "probabilities.npz")
    image = np.array(Image.open(root / "test" / "images" / "01_test.tif").convert("RGB"))
    with torch.no_grad():
        expected = network(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0, 0].numpy()
    assert np.abs(probabilities["01_test"] - expected).max() < 1e-5


def test_the_notebooks_state_dict_predicts(notebook_weights, tmp_path):
    path, _ = notebook_weights
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(photo)
    predict(
        compose_config("predict", [f"ckpt_path={path}", f"input={photo}", f"output_dir={tmp_path / 'out'}"], tmp_path)
    )
    assert (tmp_path / "out" / "photo_prob.png").is_file()


def test_a_state_dict_records_no_validation_images_so_threshold_val_is_refused(notebook_weights, tmp_path):
    path, _ = notebook_weights
    result = run_entry_point(
        "eval", [f"ckpt_path={path}", "threshold=val", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a plain state_dict, which does not record the images its training held out" in result.stderr


def test_a_state_dict_of_another_network_is_refused(tmp_path):
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), tmp_path / "other.pth")
    with pytest.raises(DataError, match="neither a retinaseg checkpoint nor a state_dict of the U-Net"):
        load_checkpoint(tmp_path / "other.pth")
    # The right keys with the wrong shapes (a bottleneck of another width) are refused too.
    state = seed_unet().build_unet().state_dict()
    state["b.conv1.weight"] = torch.zeros(8, 512, 3, 3)
    torch.save(state, tmp_path / "mangled.pth")
    with pytest.raises(DataError, match="neither a retinaseg checkpoint nor a state_dict of the U-Net"):
        load_checkpoint(tmp_path / "mangled.pth")


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "good.ckpt", compose_config("train", TINY_SYNTHETIC, tmp_path))


def edited(path, change):
    content = torch.load(path, weights_only=True)
    change(content)
    torch.save(content, path.with_name("edited.ckpt"))
    return path.with_name("edited.ckpt")


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda c: c["hyper_parameters"].update(dropout=0.1),
            "hyper_parameters this retinaseg does not know \\(dropout\\)",
        ),
        (
            lambda c: c["hyper_parameters"].update(inference="sliding"),
            "hyper_parameters.inference='sliding', not a mapping",
        ),
        (
            lambda c: c["state_dict"]["net.e1.conv_block.conv1.weight"].fill_(float("nan")),
            "weights that are not finite \\(NaN or infinity\\) in net.e1.conv_block.conv1.weight",
        ),
    ],
    ids=["unknown-entry", "inference-not-a-mapping", "nan-weights"],
)
def test_a_checkpoint_with_unexpected_content_is_refused(checkpoint, change, expected):
    load_checkpoint(checkpoint)
    with pytest.raises(DataError, match=expected):
        load_checkpoint(edited(checkpoint, change))


@pytest.mark.slow
def test_a_checkpoint_whose_weights_fail_their_crc_is_refused(checkpoint, tmp_path):
    with zipfile.ZipFile(checkpoint) as archive:  # torch.save stores its members uncompressed
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(checkpoint.read_bytes())
    # Its bytes start after the local header, whose name and (alignment) extra field lengths are at 26 and 28.
    name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)
    start = member.header_offset + 30 + name_length + extra_length
    data[start + 100 : start + 104] = b"\x7f\x7f\x7f\x7f"  # four bytes of a weight changed
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"damaged PyTorch file: {member.filename} fails its CRC check"):
        load_checkpoint(checkpoint)
    result = run_entry_point(
        "eval", [f"ckpt_path={checkpoint}", "data=synthetic", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "fails its CRC check" in result.stderr
