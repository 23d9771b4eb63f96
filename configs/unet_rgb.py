"""U-Net (skip connections) reconstructing RGB images with per-pixel MSE."""

from clevr_jax import defaults


def get_config(arg: str | None = None):
  config = defaults.get_config(arg)
  config.name = "unet_rgb"
  config.model.skip = True
  return config
