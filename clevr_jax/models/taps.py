"""The taps a network returns beside its output: named intermediate activations.

The U-Net (`models.py`) and Slot Attention (`slot_attention.py`) record their
taps through one `Recorder`, so both return them alike: only the requested ones,
widened to float32 at least (bfloat16 activations; a float64 network, as in the
device-count comparisons, keeps float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def as_tap(value: jax.Array) -> jax.Array:
  return value.astype(jnp.promote_types(value.dtype, jnp.float32))


class Recorder:
  """Collects the requested taps of one forward pass: call it with (name, value)."""

  def __init__(self, names: str | Sequence[str]) -> None:
    self.names = (names,) if isinstance(names, str) else tuple(names)
    self.wanted = frozenset(self.names)
    self.taps: dict[str, jax.Array] = {}

  def __call__(self, name: str, value: jax.Array) -> None:
    if name in self.wanted:
      self.taps[name] = as_tap(value)
