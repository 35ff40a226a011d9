"""`python -m retinaseg.eval ckpt_path=<file.ckpt> [data=<dataset>] [split=test|val|train|all] [threshold=val] [tta=true]`:
score a checkpoint by the DRIVE protocol (pooled over the FOV pixels of the split), on its own dataset or any
other, and write what every number comes from."""

import contextlib
import dataclasses
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, check_bool, check_choice, check_int, check_number, exit_on_user_error
from retinaseg.core.progress import tracked
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.data.sample import Sample, fov_source
from retinaseg.evaluation import calibration, stats
from retinaseg.evaluation.directory import EvaluationDirectory, EvaluationSettings, metrics_json
from retinaseg.evaluation.plots import draw_plots
from retinaseg.evaluation.report import table
from retinaseg.evaluation.scoring import fov_pixels, score
from retinaseg.evaluation.thresholds import best_binarisation, best_f1_threshold
from retinaseg.inference.predictor import Predictor
from retinaseg.model.checkpoint import data_settings, load_checkpoint, resolve_device
from retinaseg.runs.sweeps import in_multirun
from retinaseg.tracking.reports import log_evaluation
from retinaseg.tracking.wandb import finishing_wandb_run

config.setup()
log = logging.getLogger(__name__)

# train: the images the checkpoint trained on (its own data settings), for thresholds chosen beforehand on them
# (retinaseg.evaluation.literature).
SPLITS = ("test", "val", "train", "all")


def predict_samples(predictor: Predictor, samples: list[Sample], what: str) -> dict[str, np.ndarray]:
    """Probability map (H, W) float32 of each sample at its own resolution, by id."""
    return {s.id: predictor.photograph(s.image, s.id) for s in tracked(samples, f"predicting {what}")}


def evaluate(cfg: DictConfig) -> dict:
    """Score `cfg.ckpt_path` on `cfg.split`, write the run directory's files, return metrics.json's content."""
    check_choice("split", cfg.split, SPLITS)
    threshold = check_number("threshold", cfg.threshold, 0, 1, or_one_of=("val",))
    hysteresis = check_number("hysteresis", cfg.hysteresis, 0, 1, include_minimum=False, or_one_of=("val", None))
    min_size = check_int("min_size", cfg.min_size, minimum=0, or_one_of=("val", None))
    bridge = check_number("bridge", cfg.bridge, 0, or_one_of=("val", None))
    check_bool("tta", cfg.tta)
    check_int("plot_images", cfg.plot_images, minimum=0)
    stats.check_resamples("bootstrap", cfg.bootstrap)
    check_int("seed", cfg.seed)
    device = resolve_device(cfg.device)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    settings = {"threshold": threshold, "hysteresis": hysteresis, "min_size": min_size, "bridge": bridge}
    chosen = [name for name, value in settings.items() if value == "val"]
    if checkpoint.from_state_dict and (chosen or cfg.split == "val"):
        raise ConfigError(
            f"{checkpoint.path} is a plain state_dict, which does not record the images its training held out for "
            "validation: score it on split=test with a fixed threshold (threshold=0.5, the original's)."
        )
    # Unset options are the checkpoint's own (model.hysteresis, model.min_size, model.bridge); "val" ones are chosen
    # below.
    predictor = checkpoint.predictor(
        device,
        OmegaConf.to_container(cfg.inference),
        cfg.tta,
        threshold=None if threshold == "val" else threshold,
        hysteresis=None if hysteresis == "val" else hysteresis,
        min_size=None if min_size == "val" else min_size,
        # A bridge joins components smaller than min_size: checked with min_size once that is chosen.
        bridge=None if "val" in (bridge, min_size) else bridge,
    )
    hysteresis = predictor.binarisation.hysteresis if hysteresis is None else hysteresis
    min_size = predictor.binarisation.min_size if min_size is None else min_size
    bridge = predictor.binarisation.bridge if bridge is None else bridge
    own, target = data_settings(checkpoint, OmegaConf.to_container(cfg.data, resolve=True))
    if cfg.split == "val" and target is not own:
        raise ConfigError(
            f"split=val scores the validation images the checkpoint's training held out of its own dataset "
            f"({own['dataset']}), not images of data={target.get('dataset')}: leave data unset for split=val, or "
            "score the other dataset with split=test or split=all (threshold=val still picks the threshold on the "
            "checkpoint's own validation images)."
        )
    own_data = FundusDataModule(**own)
    data = own_data if target is own else FundusDataModule(**target)

    if chosen or cfg.split == "val":
        # The training images only: test labels are never read to choose the threshold or the options.
        val_samples = own_data.samples("val")
        own_predictor = dataclasses.replace(predictor, preprocessing=own_data.preprocessing)
        val_probs = predict_samples(own_predictor, val_samples, "validation images")
    if threshold == "val":
        threshold = best_f1_threshold(val_probs, val_samples)
        log.info("threshold %.4f maximises F1 on the %d validation images", threshold, len(val_samples))
    if "val" in (hysteresis, min_size, bridge):
        binarisation = best_binarisation(val_probs, val_samples, threshold, hysteresis, min_size, bridge)
        log.info(
            "hysteresis %s, min_size %d and bridge %g maximise F1 on the %d validation images",
            binarisation.hysteresis,
            binarisation.min_size,
            binarisation.bridge,
            len(val_samples),
        )
    else:
        # The predictor's options, checked where it was built; the threshold may have been chosen since.
        binarisation = dataclasses.replace(predictor.binarisation, threshold=threshold)
    if cfg.split == "val":
        data, samples, probs = own_data, val_samples, val_probs
    else:
        samples = data.samples(cfg.split)
        probs = predict_samples(
            dataclasses.replace(predictor, preprocessing=data.preprocessing), samples, f"{cfg.split} images"
        )

    observer = None
    if all(s.second_label is not None for s in samples):
        observer = [s.second_label for s in samples]
    scores = score(
        [s.id for s in samples],
        [probs[s.id] for s in samples],
        [s.label for s in samples],
        [s.fov for s in samples],
        binarisation,
        observer,
        cfg.bootstrap,
        cfg.seed,
    )
    reliability = calibration.Reliability.of(*(pixels.numpy() for pixels in fov_pixels(probs, samples)))
    numbers = {**scores.metrics, "ece": reliability.ece}
    settings = EvaluationSettings(
        threshold=float(threshold),
        threshold_from="validation F1" if cfg.threshold == "val" else "fixed",
        binarisation={
            **binarisation.to_json(),
            "chosen_on_validation_images": [name for name in chosen if name != "threshold"],
        },
        region="fov",
        dataset=data.hparams.dataset,
        split=cfg.split,
        n_images=len(samples),
        fov=fov_source(samples),
        scale=data.preprocessing.scale,
        tta=bool(cfg.tta),
        inference=predictor.description(),
        checkpoint=checkpoint.name or str(checkpoint.path.resolve()),
        bootstrap={"resamples": cfg.bootstrap, "seed": cfg.seed, "level": 0.95},
    )
    metrics = metrics_json(numbers, settings)
    directory = EvaluationDirectory(output_dir)
    directory.write_scores(scores, probs, samples)
    figures = draw_plots(directory.plots, metrics, probs, samples, cfg.plot_images, reliability, binarisation)
    directory.write_metrics(numbers, settings)  # last: where metrics.json is, the evaluation finished
    # A W&B run joins the group of the training run that wrote the checkpoint.
    loggers = config.instantiate_group(cfg.get("logger"), wandb={"training_group": checkpoint.wandb_group})
    log_evaluation(
        loggers, numbers, settings, scores.rows, figures, samples[: cfg.plot_images], probs, checkpoint, predictor.net
    )
    print(table(metrics))
    log.info("evaluation of %s written to %s", metrics["checkpoint"], output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    # In a sweep a failing job is left to Hydra, which records it and goes on (retinaseg.runs.sweeps reports it).
    with contextlib.nullcontext() if in_multirun() else exit_on_user_error(), finishing_wandb_run():
        evaluate(cfg)


if __name__ == "__main__":
    main()
