"""Every bad setting, through every entry point, is one line `error: ...` naming the setting and what it may be,
and exit status 2: never a traceback, never a run that goes on with it.

The table runs in-process through the same `exit_on_user_error` the entry points use; train and benchmark
also run as the user would type them (a subprocess each, a few seconds apiece), eval and predict in
tests/test_rundir.py (a run directory they refuse, through the Hydra callback).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.checkpoints import write_checkpoint
from helpers.commands import error_lines, run_entry_point
from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.benchmark import benchmark
from retinaseg.core.errors import exit_on_user_error
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.eval import evaluate
from retinaseg.export import export
from retinaseg.predict import predict
from retinaseg.train import train

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
FUNCTIONS = {"train": train, "eval": evaluate, "predict": predict, "benchmark": benchmark, "export": export}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint of the tiny synthetic model, a weights-only one, a plain state_dict, a photograph, an empty FOV
    mask and a file where a folder is expected (made once: the tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("files")
    cfg = compose_config("train", TINY_SYNTHETIC, tmp_path / "unused")
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", cfg)
    weights_only = write_checkpoint(tmp_path / "weights.ckpt", cfg, resumable=False)
    state_dict = tmp_path / "unet.pth"
    torch.save({k.removeprefix("net."): v for k, v in torch.load(checkpoint)["state_dict"].items()}, state_dict)
    photo = tmp_path / "photo.png"
    Image.fromarray(synthetic_samples(1, height=64, width=64)[0].image).save(photo)
    empty_fov = tmp_path / "empty_fov.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty_fov)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder\n")
    return {
        "ckpt": checkpoint,
        "weights": weights_only,
        "state_dict": state_dict,
        "photo": photo,
        "empty_fov": empty_fov,
        "a_file": a_file,
    }


def base_overrides(entry: str, files: dict, tmp_path) -> list[str]:
    return {
        "train": TINY_SYNTHETIC,
        "eval": [f"ckpt_path={files['ckpt']}"],
        "predict": [f"ckpt_path={files['ckpt']}", f"input={files['photo']}", f"output_dir={tmp_path / 'out'}"],
        "benchmark": [o for o in TINY_SYNTHETIC if not o.startswith("trainer.")] + ["steps=1", "rounds=1"],
        "export": [f"ckpt_path={files['ckpt']}"],
    }[entry]


TABLE = [
    ("train", "data.num_workers=-1", "data.num_workers must be an integer >= 0; got -1"),
    ("train", "model.lr=-1", "model.lr must be a number > 0; got -1"),
    ("train", "model.lr=abc", "model.lr must be a number > 0; got 'abc'"),
    ("train", "model.threshold=2", r"model.threshold must be a number in [0, 1]; got 2"),
    ("train", "model.loss=foo", "model.loss must be one of dice, bce, dice_bce, dice_bce_cldice; got 'foo'"),
    ("train", "model.scheduler=foo", "model.scheduler must be one of null, cosine, plateau; got 'foo'"),
    ("train", "model.inference.mode=foo", "model.inference.mode must be one of whole, sliding; got 'foo'"),
    ("train", "model.depth=0", "model.depth must be an integer >= 1; got 0"),
    ("train", "model.inference.window=0", "model.inference.window must be an integer >= 1; got 0"),
    ("train", "trainer.precision=foo", "Precision 'foo' is invalid. Allowed precision values:"),
    ("train", "seed=abc", "seed must be an integer; got 'abc'"),
    ("train", "trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1, or -1 for no limit"),
    ("train", "data.clahe=no", "data.clahe must be true or false; got 'no'"),
    ("train", "budget=soon", "budget='soon' is not a duration: write DD:HH:MM:SS"),
    ("train", "budget=0", "budget=0 must be a positive duration"),
    ("train", "ckpt_path={weights}", "holds a model's weights only"),
    ("train", "ckpt_path={state_dict}", "holds a model's weights only"),
    ("eval", "threshold=abc", r"threshold must be a number in [0, 1] or val; got 'abc'"),
    ("eval", "threshold=2", r"threshold must be a number in [0, 1] or val; got 2"),
    ("eval", "hysteresis=0", r"hysteresis must be a number in (0, 1] or val or null; got 0"),
    ("eval", "min_size=-3", "min_size must be an integer >= 0 or val or null; got -3"),
    ("eval", "bridge=-1", "bridge must be a number >= 0 or val or null; got -1"),
    ("eval", "bridge=4", "bridge=4 joins the components smaller than min_size to the larger ones"),
    ("eval", "tta=no", "tta must be true or false; got 'no'"),
    ("eval", "split=training", "split must be one of test, val, train, all; got 'training'"),
    ("eval", "inference.mode=foo", "inference.mode must be one of whole, sliding; got 'foo'"),
    ("eval", "inference.window=0", "inference.window must be an integer >= 1; got 0"),
    ("eval", "inference.backend=onnx", "inference.backend must be one of torch, openvino, auto; got 'onnx'"),
    ("eval", "inference.precision=fp16", "inference.precision must be one of fp32, bf16; got 'fp16'"),
    pytest.param("eval", "device=cuda", "device=cuda but this machine has no usable GPU", marks=NO_GPU),
    ("predict", "threshold=2", r"threshold must be a number in [0, 1] or null; got 2"),
    ("predict", "threshold=-1", r"threshold must be a number in [0, 1] or null; got -1"),
    ("predict", "threshold=abc", r"threshold must be a number in [0, 1] or null; got 'abc'"),
    ("predict", "min_size=big", "min_size must be an integer >= 0 or null; got 'big'"),
    ("predict", "bridge=far", "bridge must be a number >= 0 or null; got 'far'"),
    ("train", "model.hysteresis=1.5", r"model.hysteresis must be a number in (0, 1]; got 1.5"),
    ("predict", "tta=no", "tta must be true or false; got 'no'"),
    ("predict", "inference.backend=onnx", "inference.backend must be one of torch, openvino, auto; got 'onnx'"),
    ("predict", "output_dir={a_file}", "is a file: pass a folder"),
    ("predict", "fov={empty_fov}", "is empty (all zero)"),
    pytest.param("predict", "device=cuda", "device=cuda but this machine has no usable GPU", marks=NO_GPU),
    ("benchmark", "steps=0", "steps must be an integer >= 1; got 0"),
    ("benchmark", "precisions=[foo]", "precisions[] must be one of 32-true, bf16-mixed, 16-mixed; got 'foo'"),
    ("benchmark", "model.lr=-1", "model.lr must be a number > 0; got -1"),
    ("benchmark", "data.num_workers=-1", "data.num_workers must be an integer >= 0; got -1"),
    ("benchmark", "backends=[onnx]", "backends[] must be one of torch-fp32, torch-fp32-channels_last"),
    ("export", "output=mask", "output must be one of probabilities, logits; got 'mask'"),
    ("export", "format=tflite", "format must be one of onnx; got 'tflite'"),
]


@pytest.mark.parametrize("entry, override, message", TABLE)
def test_a_bad_setting_is_one_error_line_and_exit_2(entry, override, message, files, tmp_path, capsys):
    override = override.format(**files)
    cfg = compose_config(entry, base_overrides(entry, files, tmp_path) + [override], tmp_path / "run")
    with pytest.raises(SystemExit) as stop, exit_on_user_error():
        FUNCTIONS[entry](cfg)
    assert stop.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert message in line
    assert not (tmp_path / "run" / "checkpoints").exists() and not list(tmp_path.glob("out/*"))


@pytest.mark.parametrize(
    "entry, overrides, message",
    [
        pytest.param("train", ["model.lr=abc"], "model.lr must be a number > 0; got 'abc'", marks=pytest.mark.slow),
        pytest.param("benchmark", ["steps=0"], "steps must be an integer >= 1; got 0", marks=pytest.mark.slow),
    ],
)
def test_from_the_command_line_a_bad_setting_is_one_error_line_and_exit_2(entry, overrides, message, files, tmp_path):
    run_dir = tmp_path / "run"
    args = base_overrides(entry, files, tmp_path) + overrides + [f"hydra.run.dir={run_dir}"]
    result = run_entry_point(entry, args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert message in line
    assert "Traceback" not in result.stderr + result.stdout
