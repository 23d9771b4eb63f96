"""Auto-Encoder (the U-Net without skips) reconstructing RGB images with per-pixel MSE."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.name = "ae_rgb"
  config.model.skip = False
  return config
