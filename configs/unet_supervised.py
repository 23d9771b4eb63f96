"""U-Net trained supervised for 4-class semantic segmentation (background, sphere, cylinder, cube)."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.name = "unet_supervised"
  config.task = "segmentation"
  config.model.skip = True
  return config
