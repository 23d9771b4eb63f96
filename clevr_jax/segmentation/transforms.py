"""Per-image feature transforms applied before clustering, in jax.numpy.

Every function maps features [B, h, w, c] to [B, h, w, c'] and treats each
image on its own (statistics are per image, never per batch), so an image's
result does not depend on the batch it sits in or the device it runs on.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

# sRGB (D65) -> XYZ, and the D65 white point (CIE 1931 2 degree observer).
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_WHITE = (0.95047, 1.0, 1.08883)
_EPS = 1e-6


def l2_normalize(x: jax.Array) -> jax.Array:
  """Each pixel's feature vector to unit length (zero vectors stay zero)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


def standardize(x: jax.Array) -> jax.Array:
  """Per image and channel: zero mean, unit variance (constant channels -> 0)."""
  mean = x.mean(axis=(1, 2), keepdims=True)
  std = x.std(axis=(1, 2), keepdims=True)
  return (x - mean) / jnp.where(std > _EPS, std, 1.0)


def pca(x: jax.Array, dim: int) -> jax.Array:
  """Per image: centred features projected on their top `dim` principal axes.

  Keeps the input when it has at most `dim` channels. The axes' signs are
  arbitrary; clustering does not care.
  """
  b, h, w, c = x.shape
  if c <= dim:
    return x
  flat = x.reshape(b, h * w, c)
  flat = flat - flat.mean(axis=1, keepdims=True)
  cov = jnp.einsum("bnc,bnd->bcd", flat, flat) / (h * w)
  _, vectors = jnp.linalg.eigh(cov)  # ascending eigenvalues
  top = vectors[..., ::-1][..., :dim]
  return jnp.einsum("bnc,bcd->bnd", flat, top).reshape(b, h, w, dim)


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """sRGB in [0, 1] -> CIE L*a*b* (D65), divided by 100 (L* in [0, 1]).

  Lab distances follow perceived colour difference more closely than RGB
  ones: shading changes L* but moves a*, b* little.
  """
  rgb = jnp.clip(rgb, 0.0, 1.0)
  linear = jnp.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
  xyz = linear @ jnp.asarray(_RGB_TO_XYZ, rgb.dtype).T / jnp.asarray(_WHITE, rgb.dtype)
  delta = 6.0 / 29.0
  f = jnp.where(xyz > delta**3, jnp.cbrt(jnp.maximum(xyz, delta**3)),
                xyz / (3 * delta**2) + 4.0 / 29.0)
  lightness = 116.0 * f[..., 1] - 16.0
  a = 500.0 * (f[..., 0] - f[..., 1])
  b = 200.0 * (f[..., 1] - f[..., 2])
  return jnp.stack([lightness, a, b], axis=-1) / 100.0


def append_xy(x: jax.Array, weight: float) -> jax.Array:
  """Appends (row, column) coordinates in [0, 1], times `weight`."""
  b, h, w, _ = x.shape
  rows = jnp.broadcast_to(jnp.linspace(0.0, 1.0, h)[:, None], (h, w))
  cols = jnp.broadcast_to(jnp.linspace(0.0, 1.0, w)[None, :], (h, w))
  coords = jnp.broadcast_to(jnp.stack([rows, cols], -1), (b, h, w, 2))
  return jnp.concatenate([x, weight * coords.astype(x.dtype)], axis=-1)


def upsample_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """[B, h, w, c] -> [B, height, width, c] by repeating pixels (integer factors)."""
  _, h, w, _ = x.shape
  if height % h or width % w:
    raise ValueError(f"({height}, {width}) is not a multiple of ({h}, {w})")
  return jnp.repeat(jnp.repeat(x, height // h, axis=1), width // w, axis=2)


def hypercolumn(taps: Sequence[jax.Array]) -> jax.Array:
  """Several taps standardised, upsampled to the finest one's size, concatenated.

  Each tap is standardised first so that no tap outweighs the others by its
  scale; each is then divided by sqrt(channels) so that every tap carries the
  same total variance whatever its width.
  """
  height = max(t.shape[1] for t in taps)
  width = max(t.shape[2] for t in taps)
  parts = [upsample_nearest(standardize(t), height, width) / jnp.sqrt(t.shape[-1])
           for t in taps]
  return jnp.concatenate(parts, axis=-1)


def apply(x: jax.Array, names: Sequence[str], *, is_rgb: bool, pca_dim: int,
          xy_weight: float) -> jax.Array:
  """Applies the named transforms (`spec.TRANSFORMS`) in order. 'lab' applies to
  RGB images only."""
  for name in names:
    if name == "l2":
      x = l2_normalize(x)
    elif name == "standardize":
      x = standardize(x)
    elif name == "pca":
      x = pca(x, pca_dim)
    elif name == "lab":
      x = rgb_to_lab(x) if is_rgb and x.shape[-1] == 3 else x
    elif name == "xy":
      x = append_xy(x, xy_weight)
    else:
      raise ValueError(f"unknown feature transform {name!r}")
  return x
