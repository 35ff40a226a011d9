"""`python -m retinaseg.predict input=<file or folder> [ckpt_path=<file.ckpt>] [output_dir=<folder>] [fov=<file or folder>]`:
vessel maps of fundus photographs of any size, with the checkpoint's own model and preprocessing (retinaseg.data.preprocess);
without ckpt_path, with the packaged DRIVE model (pretrained:drive).

For each photograph `<stem>.<ext>` it writes `<stem>_prob.png` (probability x 255), `<stem>_mask.png`
(0/255) and `<stem>_overlay.png` (vessels and the FOV outline drawn over the photograph), and predictions.csv: a
row per photograph, written or skipped and why, and how it compares with the model's training photographs
(retinaseg.inference.quality), with a warning for each value outside their range (also logged, one line per photograph). In
a folder, a photograph that cannot be read (or has no usable FOV mask) is skipped with a warning; the run fails
(exit status 2) only when none could be segmented.
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from retinaseg.core import config
from retinaseg.core.errors import (
    ConfigError,
    check_bool,
    check_int,
    check_number,
    exit_on_user_error,
)
from retinaseg.inference.photographs import REPORT, output_folder, photographs, segment
from retinaseg.model.checkpoint import load_checkpoint, resolve_device
from retinaseg.runs.rundir import RunDir

config.setup()
log = logging.getLogger(__name__)

# The model used without ckpt_path: the one that comes with the package (retinaseg/pretrained/drive/).
DEFAULT_MODEL = "pretrained:drive"


def predict(cfg: DictConfig) -> list[Path]:
    """Segment every photograph of `cfg.input` into `cfg.output_dir`; return the masks written."""
    tta = check_bool("tta", cfg.tta)
    threshold = check_number("threshold", cfg.threshold, 0, 1, or_one_of=(None,))
    hysteresis = check_number("hysteresis", cfg.hysteresis, 0, 1, include_minimum=False, or_one_of=(None,))
    min_size = check_int("min_size", cfg.min_size, minimum=0, or_one_of=(None,))
    bridge = check_number("bridge", cfg.bridge, 0, or_one_of=(None,))
    device = resolve_device(cfg.device)
    source = Path(cfg.input).expanduser() if cfg.input else None
    if source and source.is_dir() and RunDir(source).task() == "predict":
        raise ConfigError(
            f"input={source} is the output folder of an earlier predict run (it holds .hydra/): its files are vessel "
            "maps, not photographs. Pass the folder of the photographs."
        )
    photos = photographs(cfg.input)
    output_dir = output_folder(cfg.output_dir, photos)
    checkpoint = load_checkpoint(cfg.ckpt_path or DEFAULT_MODEL)
    if not cfg.ckpt_path:
        log.info(
            "no ckpt_path given: using the model that comes with retinaseg, ckpt_path=%s (trained on DRIVE; its card: %s)",
            DEFAULT_MODEL,
            checkpoint.path.with_name("README.md"),
        )
    scale = None if cfg.scale is None else check_number("scale", cfg.scale, 0, include_minimum=False)
    # Unset: the checkpoint's own (model.threshold, model.hysteresis, model.min_size, model.bridge, data.scale), as
    # eval's.
    predictor = checkpoint.predictor(
        device, OmegaConf.to_container(cfg.inference), tta, threshold, hysteresis, min_size, bridge, scale
    )
    fov_path = Path(cfg.fov).expanduser() if cfg.fov else None
    log.info(
        "segmenting %d photograph(s) on %s (%s) into %s",
        len(photos),
        device,
        predictor.binarisation.words(),
        output_dir,
    )
    if checkpoint.references is None:
        log.warning(
            "%s records no ranges of its training photographs: brightness, contrast, vessel density and size are "
            "written to %s unchecked (ranges unknown)",
            checkpoint.path,
            REPORT,
        )

    return segment(predictor, photos, output_dir, fov_path, checkpoint.references, cfg.input)


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        predict(cfg)


if __name__ == "__main__":
    main()
