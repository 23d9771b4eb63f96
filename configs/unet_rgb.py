"""U-Net (skip connections) reconstructing RGB images with per-pixel MSE."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.name = "unet_rgb"
  config.model.skip = True
  return config
