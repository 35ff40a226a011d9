"""Training callbacks: figures of the run (retinaseg.plots) written into its directory and sent to loggers."""

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from retinaseg import plots

log = logging.getLogger(__name__)


class PlotsCallback(L.Callback):
    """`plots/curves.png` (loss, recall, precision, F1 per epoch) at the end of fit, from the CSV log;
    `plots/predictions.png` (image | label | prediction | errors of the first `num_images` test images)
    at the end of testing, from the probabilities `test_step` returns."""

    def __init__(self, dirpath: str, num_images: int = 4):
        self.dirpath, self.num_images = Path(dirpath), num_images
        self.rows: list[dict] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            log.info("no CSV logger: plots/curves.png is not drawn")
            return
        csv_logger.save()  # flush rows still buffered
        path = plots.training_curves(Path(csv_logger.log_dir) / "metrics.csv", self.dirpath / "curves.png")
        plots.log_images(trainer.loggers, {"plots/curves": path})
        log.info("training curves: %s", path)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        for i in range(len(outputs["probs"])):
            if len(self.rows) == self.num_images:
                return
            self.rows.append(
                {
                    "id": batch["id"][i],
                    "image": batch["image"][i].cpu(),
                    "label": batch["label"][i, 0].cpu().numpy(),
                    "fov": batch["fov"][i, 0].cpu().numpy(),
                    "prob": outputs["probs"][i, 0].float().cpu().numpy(),
                }
            )

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            path = plots.results_grid(self.rows, pl_module.hparams.threshold, self.dirpath / "predictions.png")
            plots.log_images(trainer.loggers, {"plots/predictions": path})
            log.info("test predictions: %s", path)
        self.rows = []
