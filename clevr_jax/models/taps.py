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


def check_input(x: jax.Array, taps: Sequence[str], valid: Sequence[str], factor: int,
                field: str) -> None:
  """ValueError unless `taps` are among `valid` and `x` is [B, H, W, C] with H and W
  divisible by `factor` (= 2**`field`, the network's halvings)."""
  unknown = [t for t in taps if t not in valid]
  if unknown:
    raise ValueError(f"Unknown tap name(s) {unknown}; valid names: {list(valid)}")
  if x.ndim != 4:
    raise ValueError(f"Expected input of shape [batch, height, width, channels]; got {x.shape}")
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f"Input height and width must be divisible by 2**{field} = {factor}; "
                     f"got {x.shape[1]}x{x.shape[2]}")


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
