"""Auto-Encoder reconstructing grayscale images, loss weighted by inverse gray/colour frequency."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.name = "ae_gray"
  config.model.skip = False
  config.data.grayscale = True
  config.loss.weighted = True
  return config
