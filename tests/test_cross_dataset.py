"""Scoring a checkpoint on another dataset (`data=<name>`): a DRIVE model scored on a STARE-layout copy of DRIVE
test images gives DRIVE's numbers up to the estimated FOV; data.scale with scores at the original resolution;
the checkpoint x dataset table of an evaluation sweep."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from helpers.commands import run_entry_point
from helpers.configs import compose_config
from helpers.datasets import link_drive, make_chase, make_stare, read_split
from retinaseg.data.preprocess import estimate_fov
from retinaseg.data.sources.stare import LABELLED as STARE_LABELLED
from retinaseg.data.sources.synthetic import synthetic_samples
from retinaseg.eval import evaluate
from retinaseg.model.checkpoint import load_checkpoint


@pytest.fixture
def drive_subset(drive_root, tmp_path):
    """A DRIVE folder holding test images 01-04 (links to the real files)."""
    return link_drive(
        drive_root, tmp_path / "DRIVE", "test", range(1, 5), ("images", "1st_manual", "2nd_manual", "mask")
    )


def run_eval(ckpt_path, overrides: list[str], output_dir) -> dict:
    return evaluate(compose_config("eval", [f"ckpt_path={ckpt_path}", "plot_images=0", *overrides], output_dir))


def pooled(probs, samples, fovs, labels=None) -> tuple[float, float]:
    """F1 at 0.5 and AUC by scikit-learn over the pixels of `fovs`."""
    p = np.concatenate([probs[s.id][f] for s, f in zip(samples, fovs, strict=True)])
    y = np.concatenate([(s.label if labels is None else labels(s))[f] for s, f in zip(samples, fovs, strict=True)])
    return f1_score(y, p > 0.5), roc_auc_score(y, p) if labels is None else None


@pytest.mark.slow
def test_drive_checkpoint_on_a_stare_copy_of_drive_gives_drives_numbers_up_to_the_fov(
    drive_checkpoint, drive_subset, tmp_path
):
    samples = read_split("drive", drive_subset, "test")
    # STARE's layout and formats (gzipped P6 PPMs in tars), 1st_manual as labels-ah, 2nd_manual as labels-vk.
    stare = make_stare(tmp_path / "STARE", samples, STARE_LABELLED[:4], unlabelled=0)
    on_drive = run_eval(drive_checkpoint, [f"data.root={drive_subset}"], tmp_path / "drive")
    on_stare = run_eval(drive_checkpoint, ["data=stare", f"data.root={stare}", "split=all"], tmp_path / "stare")
    assert (on_drive["dataset"], on_drive["fov"], on_stare["dataset"], on_stare["fov"]) == (
        "drive",
        "given",
        "stare",
        "estimated",
    )
    assert on_drive["n_images"] == on_stare["n_images"] == 4 and on_stare["scale"] == 1.0

    drive_probs, stare_probs = (np.load(tmp_path / name / "probabilities.npz") for name in ("drive", "stare"))
    for s, name in zip(samples, STARE_LABELLED, strict=False):
        assert np.array_equal(drive_probs[s.id], stare_probs[name])  # the same photograph, read from a PPM
    renamed = {name: drive_probs[s.id] for s, name in zip(samples, STARE_LABELLED, strict=False)}

    # Scored inside the same FOV, the numbers are the same: each run's equal a recomputation over its own FOV.
    estimated = [estimate_fov(s.image) for s in samples]
    stare_samples = read_split("stare", stare, "all")
    for metrics, probs, scored, fovs in (
        (on_drive, drive_probs, samples, [s.fov for s in samples]),
        (on_stare, renamed, stare_samples, estimated),
    ):
        f1, auc = pooled(probs, scored, fovs)
        assert metrics["f1"] == pytest.approx(f1, abs=1e-6) and metrics["auc"] == pytest.approx(auc, abs=1e-5)
        observer_f1, _ = pooled({s.id: s.second_label.astype(float) for s in scored}, scored, fovs)
        assert metrics["second_observer"]["f1"] == pytest.approx(observer_f1, abs=1e-6)
    # ... and the estimated FOV is DRIVE's given one but for a rim.
    for s, fov in zip(samples, estimated, strict=True):
        assert (fov & s.fov).sum() / (fov | s.fov).sum() > 0.98
    assert on_stare["f1"] == pytest.approx(on_drive["f1"], abs=0.01)


@pytest.mark.slow
def test_scale_is_the_target_datasets_and_scores_stay_at_full_resolution(drive_checkpoint, drive_subset, tmp_path):
    samples = read_split("drive", drive_subset, "test")[:2]
    stare = make_stare(tmp_path / "STARE", samples, STARE_LABELLED[:2], unlabelled=0)
    metrics = run_eval(
        drive_checkpoint, ["data=stare", f"data.root={stare}", "split=all", "data.scale=0.5"], tmp_path / "eval"
    )
    assert metrics["scale"] == 0.5
    checkpoint = load_checkpoint(drive_checkpoint)
    module, preprocessing = checkpoint.build_module(), checkpoint.preprocessing()
    probs = np.load(tmp_path / "eval" / "probabilities.npz")
    for s, name in zip(samples, STARE_LABELLED, strict=False):
        x = dataclasses.replace(preprocessing, scale=0.5).tensor(s.image)
        assert x.shape == (3, 292, 282)  # 584x565 photographs seen at half size
        with torch.no_grad():
            expected = module.predictor.probabilities(x[None], s.label.shape)[0, 0].numpy()
        assert probs[name].shape == (584, 565) and np.array_equal(probs[name], expected)


@pytest.mark.slow
def test_another_dataset_at_another_scale_on_openvino_scores_as_on_torch(drive_checkpoint, drive_subset, tmp_path):
    pytest.importorskip("openvino")
    samples = read_split("drive", drive_subset, "test")[:2]
    stare = make_stare(tmp_path / "STARE", samples, STARE_LABELLED[:2], unlabelled=0)
    overrides = ["data=stare", f"data.root={stare}", "split=all", "data.scale=0.5"]
    results = {
        backend: run_eval(drive_checkpoint, [*overrides, f"inference.backend={backend}"], tmp_path / backend)
        for backend in ("torch", "openvino")
    }
    assert results["openvino"]["inference"]["backend"] == "openvino" and results["openvino"]["scale"] == 0.5
    torch_probs, openvino_probs = (np.load(tmp_path / backend / "probabilities.npz") for backend in results)
    for name in STARE_LABELLED[:2]:
        assert torch_probs[name].shape == (584, 565)  # scored at the photographs' own resolution
        assert np.abs(torch_probs[name] - openvino_probs[name]).max() < 1e-3
    assert results["openvino"]["f1"] == pytest.approx(results["torch"]["f1"], abs=1e-3)


@pytest.mark.slow
def test_eval_sweep_writes_the_checkpoint_by_dataset_table(drive_checkpoint, tmp_path):
    # Small synthetic photographs keep the 4 jobs quick. Test-split names: STARE's last 10 labelled images,
    # CHASE_DB1's children 11-14.
    samples = synthetic_samples(2, seed=3, height=96, width=96)
    stare = make_stare(tmp_path / "STARE", samples, STARE_LABELLED[10:12], unlabelled=0)
    chase = make_chase(tmp_path / "CHASEDB1.zip", samples, ["Image_11L", "Image_11R"])
    clahe = tmp_path / "clahe.ckpt"
    checkpoint = torch.load(drive_checkpoint, weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["clahe"] = True
    torch.save(checkpoint, clahe)
    sweep = tmp_path / "sweep"
    result = run_entry_point(
        "eval",
        [
            "-m",
            f"ckpt_path={drive_checkpoint},{clahe}",
            "data=stare,chase_db1",
            "plot_images=0",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        STARE_ROOT=str(stare),
        CHASE_DB1_ROOT=str(chase),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep / "eval_summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["checkpoint"], row["dataset"], row["split"], row["n_images"]) for row in rows] == [
        (str(path), dataset, "test", "2") for path in (drive_checkpoint, clahe) for dataset in ("stare", "chase_db1")
    ]
    for job, row in enumerate(rows):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert [float(row[key]) for key in ("f1", "auc", "sensitivity", "specificity")] == pytest.approx(
            [metrics[key] for key in ("f1", "auc", "sensitivity", "specificity")], abs=1e-12
        )
    # The model's own preprocessing: the CLAHE checkpoint scores the same images differently.
    assert rows[0]["auc"] != rows[2]["auc"]
    table = (sweep / "eval_summary.md").read_text().splitlines()
    assert table[0].startswith("| checkpoint | dataset | split") and len(table) == 2 + 4
