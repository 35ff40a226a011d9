"""How whole images go through a model: at once, or in overlapping windows. The defaults live here and nowhere
else; a config's null (`model.inference.*` in training, the `inference` group of eval and predict) keeps them, or a
checkpoint's own."""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from retinaseg.core.errors import ConfigError, check_choice, check_int, check_number

MODES = ("whole", "sliding")
WEIGHTINGS = ("constant", "gaussian")
# Peak memory of whole-image inference, per pixel of the model's input and per base channel of the U-Net (measured
# on the CPU in fp32: 35-40 bytes at 512x512 to 2048x2048 for base_channels 16 and 64).
BYTES_PER_PIXEL_CHANNEL = 40


@dataclass(frozen=True)
class InferenceSettings:
    """mode: "whole" runs each image at once (padded to the U-Net's multiple; fastest, no seams), `batch_size`
    images at a time; "sliding" tiles it with windows of `window` px that share `overlap` of their size, blended by
    `weighting` ("gaussian": window centres count more than their edges), `batch_size` windows at a time."""

    mode: str = "whole"
    window: int = 256
    overlap: float = 0.25
    batch_size: int = 4
    weighting: str = "gaussian"

    @classmethod
    def of(cls, settings: Mapping, prefix: str, base: "InferenceSettings | None" = None) -> "InferenceSettings":
        """`base` (the defaults where None) with the non-null `settings` in place of its values, each checked; a
        ConfigError names `<prefix>.<key>`."""
        checks = {
            "mode": lambda name, value: check_choice(name, value, MODES),
            "window": lambda name, value: check_int(name, value, minimum=1),
            "overlap": lambda name, value: check_number(name, value, 0, 1, include_maximum=False),
            "batch_size": lambda name, value: check_int(name, value, minimum=1),
            "weighting": lambda name, value: check_choice(name, value, WEIGHTINGS),
        }
        given = {}
        for key, value in settings.items():
            if key not in checks:
                raise ConfigError(f"{prefix}.{key} is not an inference setting; they are {', '.join(checks)}")
            if value is not None:
                given[key] = checks[key](f"{prefix}.{key}", value)
        return dataclasses.replace(base or cls(), **given)

    def memory(self, shape: tuple[int, int], base_channels: int) -> int:
        """About the bytes a U-Net of `base_channels` needs for an input of `shape` (H, W): its whole image at once,
        or `batch_size` windows at a time."""
        if self.mode == "whole":
            pixels = shape[0] * shape[1]
        else:
            pixels = min(self.window**2, shape[0] * shape[1]) * self.batch_size
        return pixels * base_channels * BYTES_PER_PIXEL_CHANNEL

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
