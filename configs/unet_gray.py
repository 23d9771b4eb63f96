"""U-Net reconstructing grayscale images, loss weighted by inverse gray/colour frequency."""

from clevr_jax import defaults


def get_config(arg: str | None = None):
  config = defaults.get_config(arg)
  config.name = "unet_gray"
  config.model.skip = True
  config.data.grayscale = True
  config.loss.weighted = True
  return config
