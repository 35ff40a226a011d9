"""The models that come with retinaseg, one folder each (`ckpt_path=pretrained:<folder>`; retinaseg.model.checkpoint)."""
