"""U-Net trained supervised for 4-class semantic segmentation (background, sphere, cylinder, cube)."""

from clevr_jax import defaults


def get_config(arg: str | None = None):
  config = defaults.get_config(arg)
  config.name = "unet_supervised"
  config.task = "segmentation"
  config.model.skip = True
  return config
