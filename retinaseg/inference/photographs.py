"""Segmenting fundus photographs into files, as `python -m retinaseg.predict` does: for each photograph
`<stem>.<ext>`, `<stem>_prob.png` (probability x 255), `<stem>_mask.png` (0/255) and `<stem>_overlay.png` (vessels and
the FOV outline drawn over the photograph), and predictions.csv: a row per photograph, written or skipped and why,
and how it compares with the model's training photographs (retinaseg.inference.quality)."""

import csv
import dataclasses
import io
import logging
from pathlib import Path

import cv2
import numpy as np

from retinaseg.core.errors import ConfigError, DataError, UserError
from retinaseg.core.progress import tracked
from retinaseg.core.safe_io import write_png, write_text
from retinaseg.data.preprocess import FORMATS, IMAGE_SUFFIXES, estimate_fov, read_fov, read_image_file, read_photograph
from retinaseg.inference.predictor import Predictor
from retinaseg.inference.quality import Quality, References, assess

log = logging.getLogger(__name__)

# What predict writes for each photograph <stem>.<ext>.
OUTPUTS = ("{}_prob.png", "{}_mask.png", "{}_overlay.png")
# What predict writes once per run: each photograph, written or skipped and why, with its quality record.
REPORT = "predictions.csv"
# Names a FOV mask of `<stem>.<ext>` may have in a fov=<folder>, in order of preference.
MASK_STEMS = ("{}", "{}_mask", "{}_fov")
VESSEL_COLOUR, FOV_COLOUR = np.array([0, 255, 0]), (0, 160, 255)


def photographs(input_path: str | None) -> list[Path]:
    """The photographs to segment: `input_path` itself, or the image files of that folder (IMAGE_SUFFIXES)."""
    if not input_path:
        raise DataError("input is not set: pass input=<photograph or folder of photographs>.")
    path = Path(input_path).expanduser()
    if not path.exists():
        raise DataError(f"input={path}: no such file or folder.")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"input={path} is not a {FORMATS} file (by its name); pass a photograph or a folder of them."
            )
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file())
    photos = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        log.warning("skipping %d file(s) in %s that are not %s: %s", len(others), path, FORMATS, ", ".join(others))
    if not photos:
        raise DataError(f"input={path} holds no {FORMATS} files.")
    stems = [p.stem for p in photos]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise DataError(
            f"input={path} holds several photographs named {', '.join(repeated)} (different extensions); their outputs would overwrite each other. Rename them."
        )
    return photos


def given_fov(photo: Path, fov: Path, shape: tuple[int, int]) -> np.ndarray:
    """The FOV mask of `photo` from fov=<mask file> (for every photograph) or fov=<folder> (matched by name)."""
    if fov.is_dir():
        names = [name.format(photo.stem) for name in MASK_STEMS]
        found = [p for name in names for p in sorted(fov.iterdir()) if p.is_file() and p.stem == name]
        if not found:
            raise DataError(
                f"no FOV mask for {photo.name} in fov={fov}: expected a file named {' or '.join(n + '.<ext>' for n in names)}."
            )
        fov = found[0]
    elif not fov.is_file():
        raise DataError(f"fov={fov}: no such file or folder.")
    return read_fov(read_image_file(fov), str(fov), str(photo), shape)


def overlay(image: np.ndarray, mask: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """The photograph with vessels tinted and the FOV outlined."""
    out = image.copy()
    out[mask] = (0.35 * image[mask] + 0.65 * VESSEL_COLOUR).astype(np.uint8)
    contours, _ = cv2.findContours(fov.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, FOV_COLOUR, thickness=max(1, round(max(image.shape) / 300)))
    return out


def output_folder(output_dir: str, photos: list[Path]) -> Path:
    """`output_dir`, made if needed, after checking that none of the files predict writes for `photos` is there
    already (predict never writes over a file it did not create in this run)."""
    folder = Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir={folder} is a file: pass a folder (it is made if it does not exist).")
    names = [name.format(p.stem) for p in photos for name in OUTPUTS] + [REPORT]
    existing = [folder / name for name in names if (folder / name).exists()]
    if existing:
        shown = ", ".join(p.name for p in existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise ConfigError(
            f"output_dir={folder} already holds {shown}, which predict would overwrite: choose another output_dir "
            "(or move those files away)."
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A row of predictions.csv."""

    photograph: str
    status: str  # written or skipped
    mask: str  # the vessel mask written, or empty
    reason: str  # why it was skipped, or empty
    quality: Quality | None = None  # how a written photograph compares with the training photographs

    def row(self) -> dict:
        quality = self.quality.row() if self.quality else {}
        return {
            "photograph": self.photograph,
            "status": self.status,
            "mask": self.mask,
            "reason": self.reason,
            **quality,
        }


def write_report(path: Path, outcomes: list[Outcome]) -> None:
    table = io.StringIO()
    rows = [outcome.row() for outcome in outcomes]
    # A skipped photograph has no quality record: its row leaves those columns empty.
    columns = list(dict.fromkeys(column for row in rows for column in row))
    writer = csv.DictWriter(table, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, table.getvalue())


def segment(
    predictor: Predictor,
    photos: list[Path],
    output_dir: Path,
    fov_path: Path | None,
    references: References | None,
    source: str,
) -> list[Path]:
    """Segment `photos` into `output_dir` (made by `output_folder`) with `predictor`, each inside its FOV (from
    `fov_path`, a mask file or folder; None: estimated); return the masks written. A photograph that cannot be read is
    skipped with a warning where `source` (input=<...>) is a folder, and stops the run where it is the one
    photograph; a DataError where none could be segmented."""
    written, outcomes, scale = [], [], predictor.preprocessing.scale
    for photo in tracked(photos, "segmenting", unit="photographs"):
        try:
            image = read_photograph(read_image_file(photo), str(photo))
            fov = estimate_fov(image) if fov_path is None else given_fov(photo, fov_path, image.shape[:2])
        except UserError as error:
            if Path(source).expanduser().is_file():  # the one photograph asked for: nothing else to do
                raise
            log.warning("skipping %s: %s", photo.name, error)
            outcomes.append(Outcome(photo.name, "skipped", "", str(error)))
            continue
        prob = predictor.photograph(image, str(photo)) * fov
        mask = predictor.mask(prob, fov)
        prob_path, mask_path, overlay_path = (output_dir / name.format(photo.stem) for name in OUTPUTS)
        write_png(prob_path, np.round(prob * 255).astype(np.uint8))
        write_png(mask_path, mask.astype(np.uint8) * 255)
        write_png(overlay_path, overlay(image, mask, fov))
        written.append(mask_path)
        quality = assess(image, fov, fov_path is not None, mask, scale, references)
        log.log(logging.WARNING if quality.warnings else logging.INFO, "%s: %s", photo.name, quality.summary())
        outcomes.append(Outcome(photo.name, "written", mask_path.name, "", quality))
    skipped = [outcome for outcome in outcomes if outcome.status == "skipped"]
    if not written:
        # Nothing is written, so nothing blocks a rerun into the same output_dir.
        raise DataError(
            f"none of the {len(photos)} photographs of input={source} could be segmented (a warning above says "
            f"why of each); the first: {skipped[0].reason}"
        )
    write_report(output_dir / REPORT, outcomes)
    log.info(
        "wrote %d vessel map(s) to %s%s",
        len(written),
        output_dir,
        f"; skipped {len(skipped)} photograph(s), listed with the reason in {REPORT}" if skipped else "",
    )
    return written
