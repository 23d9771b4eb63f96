"""Losses of the poster's runs, as pure functions on arrays (jit- and pmap-safe).

Reconstruction (plain and gray/colour-balanced MSE), the grayscale conversion
and the gray-pixel map it relies on, and pixel cross-entropy for the supervised
head. Images are channels-last floats in [0, 1].

This module imports neither TensorFlow nor `clevr_jax.data` (only its pure
NumPy `schema`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clevr_jax import schema

# Slack on the gray test, so that a channel spread of exactly 10/255 counts as
# gray despite float rounding (one 8-bit step is 1/255 ~ 4e-3, far above it).
_GRAY_EPS = 1e-6


def mse(pred: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean squared error over all pixels and channels; `weighted_mse` when weights are given."""
  if weights is not None:
    return weighted_mse(pred, target, weights)
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


def weighted_mse(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over all pixels and channels of weights * squared error.

  Args:
    pred, target: [..., H, W, C].
    weights: per-pixel [..., H, W] (broadcast over channels) or [..., H, W, C].

  A plain mean, not divided by sum(weights): with the weights of
  `inverse_frequency_weights` and no padding this is the average of the gray
  and non-gray groups' MSEs, and averaging it over data-parallel devices
  (equal local batch sizes) gives exactly the loss of the global batch. Padded
  pixels (weight 0) still count in the denominator: with padding, average the
  per-example means over valid examples instead.
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  if weights.ndim == diff.ndim - 1:
    weights = weights[..., None]
  return jnp.mean(weights * jnp.square(diff))


def gray_pixel_map(rgb: jax.Array, tolerance: float = schema.GRAY_TOLERANCE) -> jax.Array:
  """bool [..., H, W]: True where the RGB channels differ by at most `tolerance`."""
  spread = jnp.max(rgb, axis=-1) - jnp.min(rgb, axis=-1)
  return spread <= tolerance + _GRAY_EPS


def inverse_frequency_weights(gray_map: jax.Array, valid_mask: jax.Array | None = None,
                              *, axis_name: str | None = None) -> jax.Array:
  """Per-pixel weights balancing gray and non-gray pixels (the poster's weighted loss).

  Each group present in the batch gets weight N / (G * n_g): N valid pixels in
  the batch, n_g of them in group g, G in {1, 2} groups present. The weights
  average to 1 over the valid pixels of the batch and each present group
  carries the same total weight (with 3 gray and 1 coloured pixel: 4/6 and
  4/2); a group absent from the batch gets nothing and the other weight 1.
  Pixels outside `valid_mask` (padding) get weight 0 and count in neither group.

  Frequencies are counted per batch rather than once over the dataset: the
  weights come from the images at hand, so no dataset pass is needed and the
  loss is defined for any input stream. With `axis_name` the counts are summed
  over that data-parallel axis, so a global batch is weighted the same however
  many devices it is split over.

  Args:
    gray_map: bool [..., H, W] from `gray_pixel_map`.
    valid_mask: optional bool [..., H, W] (or broadcastable) of pixels that count.
    axis_name: optional pmap / shard_map axis to sum the counts over.

  Returns:
    float32 [..., H, W].
  """
  gray = gray_map.astype(bool)
  valid = jnp.ones_like(gray) if valid_mask is None else jnp.broadcast_to(
      valid_mask.astype(bool), gray.shape)
  counts = jnp.stack([jnp.sum(gray & valid, dtype=jnp.float32),
                      jnp.sum(~gray & valid, dtype=jnp.float32)])
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  n_gray, n_color = counts[0], counts[1]
  groups = jnp.maximum((n_gray > 0).astype(jnp.float32) + (n_color > 0).astype(jnp.float32),
                       1.0)
  # max(., 1) only guards absent groups, whose weight is never used.
  w_gray = (n_gray + n_color) / (groups * jnp.maximum(n_gray, 1.0))
  w_color = (n_gray + n_color) / (groups * jnp.maximum(n_color, 1.0))
  weights = jnp.where(gray, w_gray, w_color)
  return jnp.where(valid, weights, 0.0).astype(jnp.float32)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                        valid: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy over (valid) pixels.

  Args:
    logits: [..., H, W, C], computed in float32 whatever their dtype.
    labels: int [..., H, W] class indices.
    valid: optional bool [..., H, W]; the mean is taken over True pixels only
      (0 when there are none).
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels.astype(jnp.int32))
  if valid is None:
    return jnp.mean(losses)
  valid = jnp.broadcast_to(valid.astype(jnp.float32), losses.shape)
  return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def to_grayscale(rgb: jax.Array) -> jax.Array:
  """Luminance (ITU-R BT.601 weights) of [..., 3] images, keeping a channel axis: [..., 1]."""
  rgb = jnp.asarray(rgb)
  if not jnp.issubdtype(rgb.dtype, jnp.floating):
    rgb = rgb.astype(jnp.float32)
  weights = jnp.asarray(schema.LUMINANCE_WEIGHTS, dtype=rgb.dtype)
  return jnp.sum(rgb * weights, axis=-1, keepdims=True)
