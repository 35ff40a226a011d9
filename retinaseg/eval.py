"""`python -m retinaseg.eval ckpt_path=<file.ckpt> [data=<dataset>] [split=test|val|train|all] [threshold=val] [tta=true]`:
score a checkpoint by the DRIVE protocol (pooled over the FOV pixels of the split), on its own dataset or any
other, and write what every number comes from."""

import contextlib
import logging
import os
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from retinaseg.core import config
from retinaseg.core.errors import ConfigError, check_bool, check_choice, check_int, check_number, exit_on_user_error
from retinaseg.core.progress import tracked
from retinaseg.data import sources
from retinaseg.data.datamodule import FundusDataModule
from retinaseg.data.preprocess import Preprocessing, resize_probabilities
from retinaseg.data.sample import Sample, fov_source
from retinaseg.evaluation import calibration, stats
from retinaseg.evaluation.directory import EvaluationDirectory, EvaluationSettings, metrics_json
from retinaseg.evaluation.plots import draw_plots
from retinaseg.evaluation.report import table
from retinaseg.evaluation.scoring import fov_pixels, score
from retinaseg.evaluation.thresholds import best_binarisation, best_f1_threshold
from retinaseg.inference.binarise import Binarisation
from retinaseg.inference.windows import Runtime, on_backend
from retinaseg.model.checkpoint import Checkpoint, load_checkpoint, resolve_device
from retinaseg.model.module import VesselSegmentationModule
from retinaseg.runs.sweeps import in_multirun
from retinaseg.tracking.reports import log_evaluation
from retinaseg.tracking.wandb import finishing_wandb_run

config.setup()
log = logging.getLogger(__name__)

# train: the images the checkpoint trained on (its own data settings), for thresholds chosen beforehand on them
# (retinaseg.evaluation.literature).
SPLITS = ("test", "val", "train", "all")
# The model's own preprocessing, always the checkpoint's (data.scale belongs to the dataset scored).
MODEL_PREPROCESSING = ("mean", "std", "clahe")


def data_settings(checkpoint: Checkpoint, data: dict) -> tuple[dict, dict]:
    """(own, target): the checkpoint's data settings (its dataset and split, where its validation images come
    from) and the settings of the images to score.

    Without `data=<name>` the target is the checkpoint's own dataset, with the non-null data.* overrides. With it
    (`data` then holds that dataset's whole config), the target is that dataset as configured (reader, root, split,
    scale) with the checkpoint's mean, std and CLAHE. A dataset path of the checkpoint's that does not exist here (a
    checkpoint from another machine, or none recorded) is replaced by the dataset's environment variable
    ($DRIVE_ROOT, ...) unless data.root is given.
    """
    own = dict(checkpoint.data)
    chosen = "dataset" in data
    if not chosen:
        own.update({key: value for key, value in data.items() if value is not None})
    env = sources.root_env(own["dataset"])
    if (chosen or data.get("root") is None) and env and os.environ.get(env) and not Path(str(own.get("root"))).exists():
        missing = (
            "the checkpoint records no data.root"  # a packaged model (pretrained:<name>)
            if own.get("root") is None
            else f"the checkpoint's data.root {own['root']} does not exist here"
        )
        log.info("%s; using %s=%s", missing, env, os.environ[env])
        own["root"] = os.environ[env]
    if not chosen:
        return own, own
    target = {key: value for key, value in data.items() if key != "_target_"}
    return own, {**target, **{key: own[key] for key in MODEL_PREPROCESSING if key in own}}


def predict_samples(
    module: VesselSegmentationModule,
    runtime: Runtime,
    samples: list[Sample],
    preprocessing: Preprocessing,
    tta: bool,
    what: str,
) -> dict[str, np.ndarray]:
    """Probability map (H, W) float32 of each sample at its own resolution, by id, with `module`'s inference
    settings on `runtime`."""
    device = module.device
    probs = {}
    for sample in tracked(samples, f"predicting {what}"):
        image = preprocessing.tensor(sample.image)[None].to(device)
        prob = resize_probabilities(module.predict_probabilities(image, tta, runtime), sample.label.shape)
        probs[sample.id] = prob[0, 0].cpu().numpy()
    return probs


def evaluate(cfg: DictConfig) -> dict:
    """Score `cfg.ckpt_path` on `cfg.split`, write the run directory's files, return metrics.json's content."""
    check_choice("split", cfg.split, SPLITS)
    threshold = check_number("threshold", cfg.threshold, 0, 1, or_one_of=("val",))
    hysteresis = check_number("hysteresis", cfg.hysteresis, 0, 1, include_minimum=False, or_one_of=("val", None))
    min_size = check_int("min_size", cfg.min_size, minimum=0, or_one_of=("val", None))
    check_bool("tta", cfg.tta)
    check_int("plot_images", cfg.plot_images, minimum=0)
    stats.check_resamples("bootstrap", cfg.bootstrap)
    check_int("seed", cfg.seed)
    device = resolve_device(cfg.device)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    settings = {"threshold": threshold, "hysteresis": hysteresis, "min_size": min_size}
    chosen = [name for name, value in settings.items() if value == "val"]
    if checkpoint.from_state_dict and (chosen or cfg.split == "val"):
        raise ConfigError(
            f"{checkpoint.path} is a plain state_dict, which does not record the images its training held out for "
            "validation: score it on split=test with a fixed threshold (threshold=0.5, the original's)."
        )
    inference = OmegaConf.to_container(cfg.inference)
    backend, precision = inference.pop("backend"), inference.pop("precision")
    module = checkpoint.build_module(inference).to(device)
    runtime = on_backend(module.net, backend, precision, module.hparams.in_channels)
    # Unset options are the checkpoint's own (model.hysteresis, model.min_size).
    hysteresis = module.binarisation.hysteresis if hysteresis is None else hysteresis
    min_size = module.binarisation.min_size if min_size is None else min_size
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
        val_probs = predict_samples(module, runtime, val_samples, own_data.preprocessing, cfg.tta, "validation images")
    if threshold == "val":
        threshold = best_f1_threshold(val_probs, val_samples)
        log.info("threshold %.4f maximises F1 on the %d validation images", threshold, len(val_samples))
    if "val" in (hysteresis, min_size):
        binarisation = best_binarisation(val_probs, val_samples, threshold, hysteresis, min_size)
        log.info(
            "hysteresis %s and min_size %d maximise F1 on the %d validation images",
            binarisation.hysteresis,
            binarisation.min_size,
            len(val_samples),
        )
    else:
        binarisation = Binarisation.checked(threshold, hysteresis, min_size)
    if cfg.split == "val":
        data, samples, probs = own_data, val_samples, val_probs
    else:
        samples = data.samples(cfg.split)
        probs = predict_samples(module, runtime, samples, data.preprocessing, cfg.tta, f"{cfg.split} images")

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
        inference={**module.inference, "backend": runtime.backend, "precision": runtime.precision},
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
    log_evaluation(loggers, metrics, scores.rows, figures, samples[: cfg.plot_images], probs, checkpoint, module)
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
