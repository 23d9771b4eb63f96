"""The poster's settings on the real data (see `clevr_jax/defaults.py`, where every
run file's defaults live, so that the installed package alone can load a run file)."""

from clevr_jax.defaults import get_config

__all__ = ["get_config"]  # config_flags calls it
