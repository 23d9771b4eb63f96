"""Auto-Encoder (the U-Net without skips) reconstructing RGB images with per-pixel MSE."""

from clevr_jax import defaults


def get_config(arg: str | None = None):
  config = defaults.get_config(arg)
  config.name = "ae_rgb"
  config.model.skip = False
  return config
