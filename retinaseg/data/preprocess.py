"""Everything done to a photograph between its file and the model, in one place: training, evaluation and
prediction all call these functions.

Reading (any PNG, JPEG, TIFF, PPM, GIF or BMP photograph: 8- or 16-bit, RGB, RGBA or grayscale, turned upright as
its EXIF orientation tag says; labels and masks read through luminance, two-valued ones by their values;
images too large refused from their header), estimating the field of view, and `Preprocessing`: resizing by
`scale` (area), CLAHE and per-channel normalisation, plus the way back (probabilities resized to the
photograph's own size).
"""

import io
import logging
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, UnidentifiedImageError

from retinaseg.core.errors import ConfigError, DataError, check_number

log = logging.getLogger(__name__)

# The image files read (by name), and how messages name them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".gif", ".bmp")
FORMATS = "PNG, JPEG, TIFF, PPM, GIF or BMP"
# The FOV is what is brighter than this fraction of the image's 99th-percentile brightness (tuned on DRIVE's
# 40 masks: intersection over union 0.992 at worst).
FOV_LEVEL = 0.2
# A label or mask whose pixels are nearly all black or white (JPEG-like fringes) is thresholded at half
# brightness, as mmsegmentation and bob.ip.binseg read STARE, CHASE_DB1 and HRF; anything else is refused.
NEAR_BINARY = 0.99
# The most pixels an image may have: PIL's own bound against decompression bombs (89 million; HRF's photographs
# have 8.2 million). A larger one is refused from its header, before anything decodes it.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# The most bytes an image file may hold, or an archive member inflate to: MAX_PIXELS of 16-bit RGBA, uncompressed.
MAX_FILE_BYTES = MAX_PIXELS * 8
# How an EXIF orientation tag says to turn the stored pixels upright (as PIL.ImageOps.exif_transpose does).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def read_photograph(data: bytes, where: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an 8- or 16-bit RGB, RGBA or grayscale image file's bytes (`where` names it),
    turned upright as its EXIF orientation tag says."""
    orientation = read_header(data, where)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    except cv2.error:  # e.g. more pixels than OpenCV's own bound (CV_IO_MAX_IMAGE_PIXELS)
        image = None
    if image is None:
        raise unreadable(where)
    name = where.rsplit("/", 1)[-1]
    if image.dtype == np.uint16:
        image = np.round(image / 257).astype(np.uint8)  # 0..65535 onto 0..255
        log.info("%s: 16-bit, scaled to 8 bits", name)
    elif image.dtype != np.uint8:
        raise DataError(f"{where} has {image.dtype} pixels; only 8- and 16-bit images are read.")
    if image.ndim == 2 or image.shape[2] == 1:
        log.warning(
            "%s is grayscale: its channel is used as red, green and blue (the model was trained on colour photographs)",
            name,
        )
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.shape[2] == 4:
        log.warning("%s has an alpha channel, which is ignored", name)
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return upright(image, orientation, name)


def unreadable(where: str) -> DataError:
    return DataError(
        f"cannot read image {where}: it is not a {FORMATS} image, or it is damaged. Replace the file with a good copy."
    )


def check_file_size(size: int, where: str) -> None:
    """Refuses an image file of `size` bytes (or an archive member that would inflate to it) before it is read."""
    if size > MAX_FILE_BYTES:
        raise DataError(
            f"cannot read image {where}: it holds {size / 2**20:,.0f} MiB, more than an image of the largest size read "
            f"({MAX_PIXELS:,} pixels) can ({MAX_FILE_BYTES / 2**20:,.0f} MiB): it is damaged or not an image. "
            "Replace the file with a good copy."
        )


def read_image_file(path: Path) -> bytes:
    """The bytes of the image file at `path`; a file larger than an image can be is refused unread."""
    check_file_size(path.stat().st_size, str(path))
    return path.read_bytes()


def read_header(data: bytes, where: str) -> int:
    """The EXIF orientation of the image file `data` (1 where it has none, or where PIL cannot read the header),
    after refusing an image of more than MAX_PIXELS pixels before anything decodes it."""
    check_file_size(len(data), where)
    claimed = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below with a clearer message
            with Image.open(io.BytesIO(data)) as file:
                width, height = file.size
                if width * height > MAX_PIXELS:
                    claimed = f"{width}x{height}"
                else:
                    return file.getexif().get(ExifTags.Base.Orientation, 1)
    except Image.DecompressionBombError:  # PIL's own refusal, past twice MAX_PIXELS
        claimed = f"over {2 * MAX_PIXELS:,}"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, struct.error):
        return 1
    raise DataError(
        f"cannot read image {where}: its header claims {claimed} pixels, and at most {MAX_PIXELS:,} are read "
        "(a damaged file, or an image far larger than a fundus photograph): replace it, or resize it."
    )


def upright(image: np.ndarray, orientation: int, name: str) -> np.ndarray:
    """`image` (a photograph, label or mask) turned as the EXIF `orientation` tag of its file says (cameras store
    portraits sideways with one), as image viewers show it: decoders do not apply the tag."""
    if orientation not in UPRIGHT:
        return image
    log.info("%s: turned upright as its EXIF orientation tag (%d) says", name, orientation)
    return np.array(Image.fromarray(image).transpose(UPRIGHT[orientation]))


def read_mask(data: bytes, where: str, photograph: str, shape: Sequence[int]) -> np.ndarray:
    """A vessel label or FOV mask of the photograph `photograph` (of `shape` (H, W)) as (H, W) uint8 in {0, 1},
    from an image file's bytes, read through luminance (turned upright by its EXIF orientation tag, as photographs
    are). A mask of another size than its photograph's is refused.

    An image of two values is read by its values, the larger being foreground, however dark both are: DRIVE's
    palette GIFs map index 0/1 to luminance 3/253, its second observer's raw values are 0/1, and a label may be
    red on black (luminance 0/76) or 0/100. One value is foreground where bright (>= 128) or 1. A nearly binary image
    (JPEG-like fringes) is thresholded at 128.
    """
    orientation = read_header(data, where)
    try:
        with Image.open(io.BytesIO(data)) as image:
            gray = np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, struct.error):
        raise unreadable(where) from None
    gray = upright(gray, orientation, where.rsplit("/", 1)[-1])
    if gray.shape != tuple(shape[:2]):
        raise DataError(
            f"{where} is {gray.shape[1]}x{gray.shape[0]} but its image {photograph} is {shape[1]}x{shape[0]} "
            "(width x height); they must match."
        )
    values, counts = np.unique(gray, return_counts=True)
    if len(values) == 2:
        return (gray == values[1]).astype(np.uint8)
    if len(values) == 1:  # all foreground where bright, or stored as raw 1 (a 0/1 mask holding no 0)
        return np.full(gray.shape, values[0] >= 128 or values[0] == 1, np.uint8)
    extremes = counts[(values < 32) | (values > 223)].sum() / gray.size
    if extremes < NEAR_BINARY:
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise DataError(
            f"{where} is not a binary mask: it holds {len(values)} values ({shown}). Labels and FOV masks must have two values."
        )
    return (gray >= 128).astype(np.uint8)


def read_fov(data: bytes, where: str, photograph: str, shape: Sequence[int]) -> np.ndarray:
    """A given FOV mask as (H, W) bool (see `read_mask`); an empty one is refused."""
    fov = read_mask(data, where, photograph, shape).astype(bool)
    if not fov.any():
        raise DataError(f"FOV mask {where} is empty (all zero): nothing of {photograph} would be scored. Replace it.")
    return fov


def estimate_fov(image: np.ndarray) -> np.ndarray:
    """The field of view of a fundus photograph: the bright region inside its dark border, holes filled.

    Falls back to the whole image (with a warning) when no region stands out from the border.
    """
    brightness = cv2.medianBlur(np.ascontiguousarray(image.max(axis=2)), 5)
    bright = (brightness > max(10.0, FOV_LEVEL * np.percentile(brightness, 99))).astype(np.uint8)
    contours, _ = cv2.findContours(bright, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    fov = np.zeros_like(bright)
    if contours:
        cv2.drawContours(fov, [max(contours, key=cv2.contourArea)], -1, 1, thickness=cv2.FILLED)
    if fov.mean() < 0.1:
        log.warning("no field of view stands out from a dark border; the whole image is used")
        return np.ones(bright.shape, bool)
    return fov.astype(bool)


# OpenCV CLAHE settings of `equalize_contrast` (also written into an exported model's JSON).
CLAHE_CLIP_LIMIT, CLAHE_TILES = 2.0, (8, 8)


def equalize_contrast(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB with CLAHE applied to its lightness (CIE L*), colours kept.

    Contrast-limited histogram equalisation evens out the uneven illumination of fundus photographs and
    sharpens thin vessels against the background (as the gray-level CLAHE of orobix's retina-unet).
    It works on whole images: equalising a patch alone would give it another contrast.
    """
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILES)
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


# The smallest side an image resized by `scale` may have: smaller, a photograph's vessels are a pixel or two
# of blur, and its scores (at the original resolution) would be of a few pixels upsampled.
MIN_SCALED_SIDE = 32


def scaled_size(shape: Sequence[int], scale: float) -> tuple[int, int]:
    """(height, width) of an image of `shape` resized by `scale`; a ConfigError when `scale` shrinks a side under
    MIN_SCALED_SIDE."""
    height, width = max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))
    if scale < 1 and min(height, width) < MIN_SCALED_SIDE:
        raise ConfigError(
            f"scale {scale:g} makes a {shape[0]}x{shape[1]} image {height}x{width} pixels, under the "
            f"{MIN_SCALED_SIDE} a side the model needs to see vessels: use a larger scale (data.scale, or predict's "
            "scale)."
        )
    return height, width


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """The photograph resized by `scale` with area averaging (unchanged at 1)."""
    if scale == 1:
        return image
    height, width = scaled_size(image.shape, scale)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """A label or FOV mask resized like its photograph (area) and thresholded at half, in its own dtype."""
    if scale == 1:
        return mask
    height, width = scaled_size(mask.shape, scale)
    area = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return (area >= 0.5).astype(mask.dtype)


def resize_probabilities(probs: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, 1, h, w) probabilities resized (bilinear) to `size` (H, W): scores are computed at the photograph's
    own resolution whatever resolution the model worked at."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs.float(), size=tuple(size), mode="bilinear", align_corners=False)


def standardise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., 3, H, W) intensities in [0, 1], standardised per channel."""
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in (mean, std))
    return (x - mean) / std


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, scaled to [0, 1] then standardised per channel."""
    return standardise(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255), mean, std)


@dataclass(frozen=True)
class Preprocessing:
    """What a photograph goes through before the model sees it, in order: resized by `scale` (area), CLAHE on its
    lightness when `clahe`, scaled to [0, 1] and standardised by `mean` and `std`.

    Training and its checkpoints record these as data.mean, data.std, data.clahe and data.scale; evaluation and
    prediction rebuild them from the checkpoint.
    """

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    clahe: bool = False
    scale: float = 1.0

    def __post_init__(self):
        check_number("data.scale", self.scale, 0, include_minimum=False)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def of(cls, settings: dict) -> "Preprocessing":
        """From data settings (a data config or a checkpoint's datamodule hyperparameters)."""
        return cls(settings["mean"], settings["std"], bool(settings.get("clahe", False)), settings.get("scale", 1.0))

    def image(self, photograph: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8: the photograph resized and contrast-equalised, not yet normalised."""
        image = resize_image(photograph, self.scale)
        return equalize_contrast(image) if self.clahe else image

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A label or FOV mask at the resolution of `image`'s output (for training patches)."""
        return resize_mask(mask, self.scale)

    def normalize(self, image: np.ndarray) -> torch.Tensor:
        return normalize(image, self.mean, self.std)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Images (..., 3, H, W) already scaled to [0, 1] (training batches), standardised."""
        return standardise(x, self.mean, self.std)

    def tensor(self, photograph: np.ndarray) -> torch.Tensor:
        """(3, h, w) float32: the model's input for a photograph."""
        return self.normalize(self.image(photograph))
