"""Auto-Encoder reconstructing grayscale images, loss weighted by inverse gray/colour frequency."""

from clevr_jax import defaults


def get_config(arg: str | None = None):
  config = defaults.get_config(arg)
  config.name = "ae_gray"
  config.model.skip = False
  config.data.grayscale = True
  config.loss.weighted = True
  return config
