"""LightningModule: the U-Net, its loss, the optimizer, and FOV-masked metrics for every split."""

import logging
import math

import lightning as L
import torch

from retinaseg.core.errors import ConfigError, check_bool, check_choice, check_int, check_number
from retinaseg.core.machine import compile_gains
from retinaseg.data.augment import PatchBatch
from retinaseg.inference.backends import Runtime
from retinaseg.inference.binarise import Binarisation
from retinaseg.inference.predictor import Predictor
from retinaseg.inference.settings import InferenceSettings
from retinaseg.model.losses import LOSSES, SKELETON_ITERATIONS, SegmentationLoss
from retinaseg.model.metrics import FOVMetrics
from retinaseg.model.unet import UNet, rename_legacy_keys

log = logging.getLogger(__name__)

SCHEDULERS = (None, "cosine", "plateau")
COMPILE = (False, True, "auto")


class VesselSegmentationModule(L.LightningModule):
    """Trains on patches; validates and tests on whole images with `inference` (retinaseg.inference.settings).

    Every constructor argument is a plain value, saved in the checkpoint, so a checkpoint rebuilds its
    own model (size, loss, inference settings) and loads without executing pickled code.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        depth: int = 4,
        loss: str = "dice",
        cldice_weight: float = 0.5,
        cldice_iterations: int = SKELETON_ITERATIONS,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        threshold: float = 0.5,
        hysteresis: float | None = None,
        min_size: int = 0,
        bridge: float = 0.0,
        inference: dict | None = None,
        channels_last: bool = True,
        compile: bool | str = False,
    ):
        super().__init__()
        # Checked here, where the settings are read, so a bad one is named before anything is built.
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("depth", depth)):
            check_int(f"model.{name}", value, minimum=1)
        check_choice("model.loss", loss, LOSSES)
        check_number("model.cldice_weight", cldice_weight, 0)
        check_int("model.cldice_iterations", cldice_iterations, minimum=0)
        check_number("model.lr", lr, 0, include_minimum=False)
        check_number("model.weight_decay", weight_decay, 0)
        check_choice("model.scheduler", scheduler, SCHEDULERS)
        # How validation, test, eval and predict turn probabilities into vessel masks (retinaseg.inference.binarise).
        self.binarisation = Binarisation.checked(threshold, hysteresis, min_size, bridge, "model.")
        self.inference = InferenceSettings.of(inference or {}, "model.inference")
        check_bool("model.channels_last", channels_last)
        check_choice("model.compile", compile, COMPILE)
        self.save_hyperparameters()
        self.net = UNet(in_channels, 1, base_channels, depth)
        self.compiled = False  # whether configure_model compiled the net (model.compile)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.loss = SegmentationLoss(loss, cldice_weight, cldice_iterations)
        self.train_metrics = FOVMetrics(threshold, with_auc=False, prefix="train/")
        self.val_metrics = FOVMetrics(threshold, prefix="val/")
        self.test_metrics = FOVMetrics(threshold, prefix="test/")

    def configure_model(self) -> None:
        # Called by every trainer.fit/validate/test, also on a copy of the module (deepcopy drops the compiled
        # call: retinaseg.runs.budget's calibration copy compiles too, so its timing includes the compilation).
        # `net.compile()` compiles the net's call in place: the registered module and the state_dict keys
        # stay the eager ones (no `_orig_mod.`), so checkpoints load without compiling. Calling it again on
        # a compiled net reuses what was compiled. Static shapes (dynamic=False): one graph for the training patches
        # and one per whole-image size, as the U-Net's padding arithmetic on symbolic sizes fails in inductor
        # (torch 2.13: "TensorReferenceAnalysis has no attribute python_mod").
        compile = self.hparams.compile
        self.compiled = compile is True or (compile == "auto" and compile_gains(self.trainer.strategy.root_device))
        if self.compiled:
            self.net.compile(dynamic=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    @property
    def predictor(self) -> Predictor:
        """How validation and test turn whole preprocessed images into probabilities and masks: this module (under
        the Trainer's precision), its inference settings and binarisation."""
        return Predictor(Runtime("torch", "the trainer's", self), self.inference, self.binarisation, net=self.net)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Training patches arrive as uint8 crops and their drawn augmentations, and are warped and cut here, on the
        # training device; whole validation and test images arrive ready. A hook of the module, not the
        # datamodule, so that every Trainer sees it, also those given a loader alone (calibration, benchmark).
        return batch.finish() if isinstance(batch, PatchBatch) else batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(logits))
        self.train_metrics.update(logits.detach().sigmoid(), batch["label"], batch["fov"])
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_and_reset(self.train_metrics)

    def _evaluate(self, batch: dict, metrics: FOVMetrics, stage: str) -> torch.Tensor:
        # Labels and FOV masks stay at the dataset's resolution (data.scale resizes only what the model sees).
        predictor = self.predictor
        probs = predictor.probabilities(batch["image"], batch["label"].shape[-2:])
        # The loss takes logits; the round trip through logit is exact enough for a reported loss.
        loss = self.loss(torch.logit(probs, eps=1e-6), batch["label"])
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=len(probs), sync_dist=True)
        # A plain threshold is the metrics' own; the options need the whole image's connected components.
        masks = None if self.binarisation.plain else predictor.masks(probs, batch["fov"])
        metrics.update(probs, batch["label"], batch["fov"], masks)
        return probs

    # The probabilities are returned so callbacks (plots, image logging) can use them without recomputing.
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return {"probs": self._evaluate(batch, self.val_metrics, "val")}

    def on_validation_epoch_end(self) -> None:
        self._log_and_reset(self.val_metrics, prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return {"probs": self._evaluate(batch, self.test_metrics, "test")}

    def on_test_epoch_end(self) -> None:
        self._log_and_reset(self.test_metrics)

    def _log_and_reset(self, metrics: FOVMetrics, prog_bar: bool = False) -> None:
        # torchmetrics pools (and, under DDP, syncs) the whole split before computing.
        values = metrics.compute()
        self.log_dict(values, prog_bar=prog_bar)
        metrics.reset()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning reads a resumed run's checkpoint itself (not through retinaseg.model.checkpoint), then loads
        # its state_dict after this hook.
        renamed = rename_legacy_keys(checkpoint["state_dict"])
        if renamed:
            log.info(
                "renamed %d decoder keys `up.*` to the original's `up_conv.*` (written before that rename)", renamed
            )

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "cosine":
            # Over the run's optimizer steps, stepped after each one, so the schedule ends where training ends
            # whether its length is set in epochs, in steps or by a time budget (retinaseg.runs.budget).
            steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(steps):
                raise ConfigError(
                    "model.scheduler=cosine needs the length of training: set trainer.max_steps, trainer.max_epochs or budget."
                )
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(steps)))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if hp.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/f1"}}
        return optimizer
