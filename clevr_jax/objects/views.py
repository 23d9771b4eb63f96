"""Geometric views of a batch (random resized crop + horizontal flip) with their
known pixel correspondence. Pure jax.numpy, jittable, keyed by a PRNG key.

Colour jitter, the usual augmentation of contrastive methods, is left out on
purpose: colour is CLEVR's main cue to objects, and geometric views keep it.

Coordinates are normalised: (y, x) in [0, 1] over the image's extent, so pixel
i of a grid of n pixels covers [i/n, (i+1)/n] and has its centre at
(i + 0.5)/n. Normalised coordinates are the same on the image and on every tap
of the network (a tap of stride s covers the same extent with n/s pixels), so
one correspondence serves every resolution.

A view is described per example by `box` [B, 4] = (top, left, height, width)
of the crop in source coordinates and `flip` [B] (mirror the crop left-right).
View coordinates v map to source coordinates s by
  s_y = top + v_y * height,   s_x = left + (1 - v_x if flip else v_x) * width.

This module imports neither TensorFlow nor `clevr_jax.data`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

ViewParams = dict[str, jax.Array]  # {'box': [B, 4] float32, 'flip': [B] bool}


def identity_params(batch_size: int) -> ViewParams:
  """The whole image, unflipped: a view equal to its source."""
  box = jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0]], jnp.float32), (batch_size, 1))
  return {'box': box, 'flip': jnp.zeros((batch_size,), bool)}


def _one_view_params(key: jax.Array, *, min_scale: float, max_scale: float,
                     min_aspect: float, max_aspect: float, flip_prob: float
                     ) -> tuple[jax.Array, jax.Array]:
  """(box [4], flip []) of one example: area fraction uniform in [min, max],
  aspect (crop width / height fraction) log-uniform, position uniform."""
  k_scale, k_aspect, k_y, k_x, k_flip = jax.random.split(key, 5)
  scale = jax.random.uniform(k_scale, (), minval=min_scale, maxval=max_scale)
  log_aspect = jax.random.uniform(k_aspect, (), minval=math.log(min_aspect),
                                  maxval=math.log(max_aspect))
  aspect = jnp.exp(log_aspect)
  # Clipping to the image keeps the crop inside it (the area then shrinks a little).
  height = jnp.minimum(jnp.sqrt(scale / aspect), 1.0)
  width = jnp.minimum(jnp.sqrt(scale * aspect), 1.0)
  top = jax.random.uniform(k_y, ()) * (1.0 - height)
  left = jax.random.uniform(k_x, ()) * (1.0 - width)
  flip = jax.random.bernoulli(k_flip, flip_prob)
  return jnp.stack([top, left, height, width]).astype(jnp.float32), flip


def sample_params(keys: jax.Array, config: ml_collections.ConfigDict) -> ViewParams:
  """Random view parameters, one per key ([B] keys: one per example, so an
  example's view does not depend on which device or batch position holds it).

  Reads `min_scale`, `max_scale`, `min_aspect`, `max_aspect`, `flip_prob` of
  `config` (the `objectives.views` section).
  """
  if not 0.0 < config.min_scale <= config.max_scale <= 1.0:
    raise ValueError('objectives.views: need 0 < min_scale <= max_scale <= 1; got '
                     f'{config.min_scale}, {config.max_scale}')
  if not 0.0 < config.min_aspect <= config.max_aspect:
    raise ValueError('objectives.views: need 0 < min_aspect <= max_aspect; got '
                     f'{config.min_aspect}, {config.max_aspect}')
  box, flip = jax.vmap(lambda k: _one_view_params(
      k, min_scale=config.min_scale, max_scale=config.max_scale,
      min_aspect=config.min_aspect, max_aspect=config.max_aspect,
      flip_prob=config.flip_prob))(keys)
  return {'box': box, 'flip': flip}


def view_to_source(params: ViewParams, yx: jax.Array) -> jax.Array:
  """View coordinates [B, ..., 2] -> source coordinates [B, ..., 2]."""
  box = params['box'].reshape((-1,) + (1,) * (yx.ndim - 2) + (4,))
  flip = params['flip'].reshape((-1,) + (1,) * (yx.ndim - 2))
  vx = jnp.where(flip, 1.0 - yx[..., 1], yx[..., 1])
  return jnp.stack([box[..., 0] + yx[..., 0] * box[..., 2],
                    box[..., 1] + vx * box[..., 3]], axis=-1)


def source_to_view(params: ViewParams, yx: jax.Array) -> jax.Array:
  """Source coordinates [B, ..., 2] -> view coordinates [B, ..., 2] (may fall
  outside [0, 1] where the point is not in the crop)."""
  box = params['box'].reshape((-1,) + (1,) * (yx.ndim - 2) + (4,))
  flip = params['flip'].reshape((-1,) + (1,) * (yx.ndim - 2))
  vy = (yx[..., 0] - box[..., 0]) / box[..., 2]
  vx = (yx[..., 1] - box[..., 1]) / box[..., 3]
  return jnp.stack([vy, jnp.where(flip, 1.0 - vx, vx)], axis=-1)


def correspond(params_from: ViewParams, params_to: ViewParams, yx: jax.Array) -> jax.Array:
  """Where points of one view lie in another view (both of the same source)."""
  return source_to_view(params_to, view_to_source(params_from, yx))


def pixel_centres(height: int, width: int) -> jax.Array:
  """Normalised centres [height, width, 2] of a pixel grid."""
  y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  return jnp.stack(jnp.meshgrid(y, x, indexing='ij'), axis=-1)


def sample_bilinear(grid: jax.Array, yx: jax.Array) -> jax.Array:
  """Bilinear samples of `grid` [B, h, w, C] at normalised points [B, N, 2] -> [B, N, C].

  Points outside the pixel centres are clamped to the border (edge values
  repeated). Differentiable in `grid`.
  """
  _, h, w, _ = grid.shape
  fy = jnp.clip(yx[..., 0] * h - 0.5, 0.0, h - 1.0)
  fx = jnp.clip(yx[..., 1] * w - 0.5, 0.0, w - 1.0)
  y0 = jnp.floor(fy).astype(jnp.int32)
  x0 = jnp.floor(fx).astype(jnp.int32)
  y1 = jnp.minimum(y0 + 1, h - 1)
  x1 = jnp.minimum(x0 + 1, w - 1)
  wy = (fy - y0)[..., None]
  wx = (fx - x0)[..., None]
  take = jax.vmap(lambda g, yy, xx: g[yy, xx])
  top = take(grid, y0, x0) * (1 - wx) + take(grid, y0, x1) * wx
  bottom = take(grid, y1, x0) * (1 - wx) + take(grid, y1, x1) * wx
  return top * (1 - wy) + bottom * wy


def sample_nearest(grid: jax.Array, yx: jax.Array) -> jax.Array:
  """The pixel of `grid` [B, h, w, ...] containing each point [B, N, 2] -> [B, N, ...]."""
  h, w = grid.shape[1:3]
  iy = jnp.clip(jnp.floor(yx[..., 0] * h), 0, h - 1).astype(jnp.int32)
  ix = jnp.clip(jnp.floor(yx[..., 1] * w), 0, w - 1).astype(jnp.int32)
  return jax.vmap(lambda g, yy, xx: g[yy, xx])(grid, iy, ix)


def render(source: jax.Array, params: ViewParams, *, nearest: bool = False) -> jax.Array:
  """The view of `source` [B, H, W, ...] at the source's own size.

  Images are resampled bilinearly; label maps (integers) must use
  `nearest=True`, which copies the source pixel holding each view pixel centre.
  """
  b, h, w = source.shape[:3]
  centres = jnp.broadcast_to(pixel_centres(h, w).reshape(1, h * w, 2), (b, h * w, 2))
  yx = view_to_source(params, centres)
  if nearest:
    out = sample_nearest(source, yx)
  else:
    flat = source.reshape((b, h, w, -1))
    out = sample_bilinear(flat.astype(jnp.float32), yx).astype(source.dtype)
  return out.reshape(source.shape)


def shared_points(keys: jax.Array, params_a: ViewParams, params_b: ViewParams,
                  num_points: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Random points seen by both views, for dense view consistency.

  Points are drawn uniformly in the intersection of the two crops (in source
  coordinates), one key per example.

  Returns:
    (source yx [B, N, 2], view-a yx [B, N, 2], view-b yx [B, N, 2],
    valid [B]: False where the crops do not overlap).
  """
  box_a, box_b = params_a['box'], params_b['box']
  top = jnp.maximum(box_a[:, 0], box_b[:, 0])
  left = jnp.maximum(box_a[:, 1], box_b[:, 1])
  bottom = jnp.minimum(box_a[:, 0] + box_a[:, 2], box_b[:, 0] + box_b[:, 2])
  right = jnp.minimum(box_a[:, 1] + box_a[:, 3], box_b[:, 1] + box_b[:, 3])
  valid = (bottom > top) & (right > left)
  u = jax.vmap(lambda k: jax.random.uniform(k, (num_points, 2)))(keys)
  size = jnp.stack([jnp.maximum(bottom - top, 0.0), jnp.maximum(right - left, 0.0)], -1)
  source = jnp.stack([top, left], -1)[:, None] + u * size[:, None]
  return source, source_to_view(params_a, source), source_to_view(params_b, source), valid


def example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
  """One key per example [B], from the example's index in its split: random
  choices then follow the example, not its device or place in the batch
  (with JAX's default threefry keys; 'rbg' keys do not promise equal draws
  under vmap or shard_map)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(index.astype(jnp.uint32))
