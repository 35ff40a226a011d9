"""The U-Net, its losses, the LightningModule and its metrics, and model files (checkpoints)."""
