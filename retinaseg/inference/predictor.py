"""The one way from photographs to vessel probabilities and masks, shared by eval, predict, export, the benchmark
and training's validation and test: a model ready to run, the preprocessing its photographs went through in
training, its inference settings and its binarisation. `Checkpoint.predictor` builds one from a model file."""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from retinaseg.core.errors import DataError
from retinaseg.core.machine import available_memory
from retinaseg.data.preprocess import Preprocessing, resize_probabilities
from retinaseg.inference.backends import Runtime
from retinaseg.inference.binarise import Binarisation, binarise
from retinaseg.inference.settings import InferenceSettings
from retinaseg.inference.windows import flip_averaged, predict_probabilities

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictor:
    """runtime: the model's logits of preprocessed images, (N, C, H, W) -> (N, 1, H, W);
    inference: whole images or sliding windows; binarisation: probabilities -> vessel masks;
    tta: probabilities averaged over each image and its flips;
    preprocessing: what a photograph goes through before the model (scale, CLAHE, mean and std); None where the
    images come preprocessed (training's batches);
    base_channels: the U-Net's width, which the memory an input needs grows with (None: not estimated);
    device: where the photographs' tensors go;
    net: the network itself (what the runtime runs, or converted), for its size and for export."""

    runtime: Runtime
    inference: InferenceSettings
    binarisation: Binarisation
    tta: bool = False
    preprocessing: Preprocessing | None = None
    base_channels: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    net: torch.nn.Module | None = None

    def probabilities(
        self,
        images: torch.Tensor,
        size: tuple[int, int] | None = None,
        inference: InferenceSettings | None = None,
    ) -> torch.Tensor:
        """Vessel probabilities (N, 1, H, W) float32 of preprocessed images (N, C, h, w), resized to `size` (H, W)
        where given (a photograph's own size when the model saw it scaled); `inference` in place of the own."""
        settings = inference or self.inference

        def predict(x: torch.Tensor) -> torch.Tensor:
            return predict_probabilities(self.runtime, x, settings)

        probs = flip_averaged(predict, images) if self.tta else predict(images)
        return probs if size is None else resize_probabilities(probs, size)

    def photograph(self, image: np.ndarray, name: str) -> np.ndarray:
        """The vessel probabilities (H, W) float32 of a photograph (H, W, C) at its own resolution; whole-image
        inference switches to sliding windows where the photograph would not fit in memory (`name`: the
        photograph, in messages)."""
        x = self.preprocessing.tensor(image)[None].to(self.device)
        return self.probabilities(x, image.shape[:2], self.settings_that_fit(x.shape[-2:], name))[0, 0].cpu().numpy()

    def mask(self, prob: np.ndarray, fov: np.ndarray) -> np.ndarray:
        """The boolean vessel mask (H, W) of a probability map inside its boolean FOV."""
        return binarise(prob, fov, self.binarisation)

    def masks(self, probs: torch.Tensor, fovs: torch.Tensor) -> torch.Tensor:
        """The vessel masks (N, 1, H, W) bool of probabilities (N, 1, H, W) inside their FOV masks (N, 1, H, W)."""
        pairs = zip(probs[:, 0].float().cpu().numpy(), fovs[:, 0].bool().cpu().numpy())
        masks = np.stack([self.mask(prob, fov) for prob, fov in pairs])
        return torch.from_numpy(masks)[:, None].to(probs.device)

    def settings_that_fit(self, shape: tuple[int, int], name: str) -> InferenceSettings:
        """The inference settings for an input of `shape` (H, W), switched from whole images to sliding windows
        (with a warning) where the whole image would need more than half the memory available (the photograph's
        own arrays need the rest); refused where even that does not fit."""
        if self.base_channels is None:
            return self.inference
        budget = available_memory(self.device) // 2
        whole = self.inference.memory(shape, self.base_channels)
        if whole <= budget:
            return self.inference
        sliding = InferenceSettings.of({"mode": "sliding"}, "inference", base=self.inference)
        needed = sliding.memory(shape, self.base_channels)
        window = self.inference.window
        if needed <= budget:
            log.warning(
                "%s: whole-image inference at %dx%d would need about %s of the %s available; using sliding windows "
                "of %d px instead",
                name,
                shape[1],
                shape[0],
                mebibytes(whole),
                mebibytes(2 * budget),
                window,
            )
            return sliding
        raise DataError(
            f"{name} needs about {mebibytes(needed)} for inference at {shape[1]}x{shape[0]} even with sliding windows "
            f"of {window} px, more than half of the {mebibytes(2 * budget)} available: use smaller inference.window "
            "and inference.batch_size, or bring the photograph to a smaller size with scale=<factor> in predict "
            f"(data.scale=<factor> in eval; now {self.preprocessing.scale:g})."
        )

    def description(self) -> dict:
        """The inference settings with the backend and precision they ran on (as metrics.json records them)."""
        return {**self.inference.to_json(), "backend": self.runtime.backend, "precision": self.runtime.precision}


def mebibytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"
