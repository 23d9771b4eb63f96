"""Slot Attention (Locatello et al., 2020) as an auto-encoder in flax.linen.

A CNN encoder with the paper's soft position embedding turns the image into a
set of feature vectors; slot attention groups them into `num_slots` slots by
an iterative, learned soft K-Means (softmax over the slots, weighted mean,
GRU, residual MLP); a spatial-broadcast decoder renders each slot as an RGB
image and an alpha logit map, and the reconstruction is their alpha-weighted
sum (alphas softmaxed over the slots). It trains on the project's
reconstruction loss like the U-Net and returns (output, taps) like it:

  input       the image
  encoder     the features the slots attend to [b, h, w, slot_size]
  attention   the last iteration's attention over the slots [b, h, w, K]
  slot_masks  the decoder's alpha masks [b, H, W, K] (they sum to 1 per pixel)
  output      the reconstruction

Initial slots (`slot_init`) are drawn from a learned Gaussian (the paper's), per
example from the key of the 'slots' RNG stream folded with the example's row
in the global batch, so that a data-parallel step draws the same noise on any
number of devices; without a 'slots' stream (evaluation) the key is fixed:
scores are reproducible. Or they are learned queries, one per slot (BO-QSA,
Jia et al., 2023), or the centroids of a K-Means of the inputs' values (the
poster's clustering as the initialiser; no noise, no gradient through it).

Gradients through the iterations (`implicit_grad`): the paper's go through
every iteration; implicit differentiation (Chang et al., 2022) stops them
before the last one, which then sees the iterate as a fixed point. Learned
queries always do (BO-QSA), and pass the last iteration's gradient to the
queries straight through: its input is sg(slots) + queries - sg(queries).

This module imports neither TensorFlow nor `clevr_jax.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clevr_jax.models import taps as taps_lib

TAP_NAMES = ("input", "encoder", "attention", "slot_masks", "output")
UPDATES = ("gru", "mean")
# Initial slots: the paper's learned Gaussian, BO-QSA's learned queries, or
# the centroids of a K-Means of the inputs' values.
INITS = ("gaussian", "learned", "kmeans")
# The evaluation's noise (no 'slots' RNG stream given): any fixed key will do.
_EVAL_NOISE_SEED = 0


def _batch_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
  """Where `x` is explicitly split along its first axis (state.make_mesh's batch
  axis, under jit), that split for an array of any rank; else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if not spec or spec[0] is None:
    return None
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0]))


def _reshape_batch(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """x.reshape(shape) where the first axis (batch, or batch x slots) stays the
  split one: explicit sharding asks for the result's sharding when axes merge."""
  sharding = _batch_sharding(x)
  if sharding is None:
    return x.reshape(shape)
  return jax.lax.reshape(x, shape, out_sharding=sharding)


def position_grid(height: int, width: int, dtype: Any = jnp.float32) -> jax.Array:
  """The paper's [height, width, 4] grid: y, x, 1 - y, 1 - x, each from 0 to 1."""
  y = jnp.linspace(0.0, 1.0, height, dtype=dtype)
  x = jnp.linspace(0.0, 1.0, width, dtype=dtype)
  yy, xx = jnp.meshgrid(y, x, indexing="ij")
  grid = jnp.stack([yy, xx], axis=-1)
  return jnp.concatenate([grid, 1.0 - grid], axis=-1)


class SoftPositionEmbed(nn.Module):
  """Adds a learned linear map of the position grid to a [b, h, w, c] map."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    grid = position_grid(x.shape[1], x.shape[2], self.dtype)
    return x + nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=jnp.float32,
                        name="dense")(grid)[None]


def attend(queries: jax.Array, keys: jax.Array, values: jax.Array, *, scale: float,
           epsilon: float) -> tuple[jax.Array, jax.Array]:
  """One slot-attention read: (weighted means [b, K, d], attention [b, K, n]).

  The attention is a softmax over the K slots (slots compete for each input,
  as clusters compete for a point); each slot's update is the mean of the
  values weighted by its attention, renormalised over the inputs (+ epsilon,
  so that a slot that wins nothing stays finite).
  """
  logits = scale * jnp.einsum("bkd,bnd->bkn", queries, keys)
  attention = jax.nn.softmax(logits, axis=1)
  weights = attention + epsilon
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.einsum("bkn,bnd->bkd", weights, values), attention


def farthest_point_centres(points: jax.Array, k: int) -> jax.Array:
  """k of `points` [b, n, d] per example [b, k, d], chosen greedily far apart:
  the point farthest from the mean, then each time the point farthest from the
  ones chosen (k-means++'s idea without its sampling: no key, so the same on
  any device split). Ties go to the first point."""
  def farthest(sq_dist):
    return jnp.argmax(sq_dist, axis=-1)

  def sq_dist_to(centre):  # [b, d] -> [b, n]
    return jnp.sum((points - centre[:, None]) ** 2, axis=-1)

  take = lambda index: jnp.take_along_axis(points, index[:, None, None], axis=1)[:, 0]
  first = take(farthest(sq_dist_to(jnp.mean(points, axis=1))))
  centres, nearest = [first], sq_dist_to(first)
  for _ in range(k - 1):
    centres.append(take(farthest(nearest)))
    nearest = jnp.minimum(nearest, sq_dist_to(centres[-1]))
  return jnp.stack(centres, axis=1)


def kmeans_centres(points: jax.Array, k: int, iterations: int) -> jax.Array:
  """Lloyd's K-Means (squared Euclidean) of `points` [b, n, d] per example from
  `farthest_point_centres`: the centroids [b, k, d] after `iterations` steps. A
  centroid that loses all its points keeps its place."""
  centres = farthest_point_centres(points, k)
  for _ in range(iterations):
    sq_dist = (jnp.sum(points**2, -1)[:, :, None] - 2 * jnp.einsum("bnd,bkd->bnk", points, centres)
               + jnp.sum(centres**2, -1)[:, None, :])
    member = jax.nn.one_hot(jnp.argmin(sq_dist, axis=-1), k, dtype=points.dtype)  # [b, n, k]
    count = jnp.sum(member, axis=1)[..., None]  # [b, k, 1]
    sums = jnp.einsum("bnk,bnd->bkd", member, points)
    centres = jnp.where(count > 0, sums / jnp.maximum(count, 1), centres)
  return centres


class SlotAttention(nn.Module):
  """Iterative attention of K slots over n inputs (the paper's module).

  `update='mean'`, `mlp=False` and `layer_norm=False` leave the projections,
  softmax over slots and weighted mean: with identity projections, one soft
  K-Means step with dot-product similarity at temperature 1 / scale
  (tests/test_slot_attention.py).

  `slot_init='kmeans'` ignores the given slots and starts from the K-Means
  centroids of the values (`kmeans_iterations` Lloyd steps), under a stopped
  gradient. `slot_init='learned'` takes the given slots as queries to learn and
  passes them straight through to the last iteration (see the module
  docstring); `implicit_grad` stops the gradient before the last iteration.
  """
  slot_size: int = 64
  mlp_hidden: int = 128
  num_iterations: int = 3
  epsilon: float = 1e-8
  scale: float = 0.0  # 0: 1 / sqrt(slot_size), the paper's
  update: str = "gru"
  mlp: bool = True
  layer_norm: bool = True
  slot_init: str = "gaussian"
  kmeans_iterations: int = 5
  implicit_grad: bool = False
  dtype: Any = jnp.float32

  def _norm(self, name: str):
    if not self.layer_norm:
      return lambda x: x
    return nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name=name)

  @nn.compact
  def __call__(self, inputs: jax.Array, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """inputs [b, n, c], initial slots [b, K, slot_size] -> (slots, last attention [b, K, n])."""
    if self.update not in UPDATES:
      raise ValueError(f"slot update {self.update!r} is not one of {UPDATES}")
    if self.slot_init not in INITS:
      raise ValueError(f"slot init {self.slot_init!r} is not one of {INITS}")
    dense = lambda name: nn.Dense(self.slot_size, use_bias=False, dtype=self.dtype,
                                  param_dtype=jnp.float32, name=name)
    inputs = self._norm("norm_inputs")(inputs)
    keys, values = dense("project_k")(inputs), dense("project_v")(inputs)
    project_q, norm_slots = dense("project_q"), self._norm("norm_slots")
    gru = nn.GRUCell(self.slot_size, dtype=self.dtype, param_dtype=jnp.float32, name="gru")
    norm_mlp = self._norm("norm_mlp")
    mlp_in = nn.Dense(self.mlp_hidden, dtype=self.dtype, param_dtype=jnp.float32,
                      name="mlp1")
    mlp_out = nn.Dense(self.slot_size, dtype=self.dtype, param_dtype=jnp.float32,
                       name="mlp2")
    scale = self.scale or self.slot_size**-0.5
    if self.slot_init == "kmeans":
      slots = jax.lax.stop_gradient(
          kmeans_centres(values, slots.shape[1], self.kmeans_iterations)).astype(slots.dtype)
    queries = slots
    attention = None
    for i in range(self.num_iterations):
      if i == self.num_iterations - 1:
        if self.slot_init == "learned":
          slots = (jax.lax.stop_gradient(slots) + queries
                   - jax.lax.stop_gradient(queries))
        elif self.implicit_grad:
          slots = jax.lax.stop_gradient(slots)
      updates, attention = attend(project_q(norm_slots(slots)), keys, values, scale=scale,
                                  epsilon=self.epsilon)
      if self.update == "gru":
        slots, _ = gru(slots, updates)  # its Dense layers take any leading axes
      else:
        slots = updates
      if self.mlp:
        slots = slots + mlp_out(nn.relu(mlp_in(norm_mlp(slots))))
    return slots, attention


class SlotAttentionAutoEncoder(nn.Module):
  """Encoder, slot attention and spatial-broadcast decoder (see the module docstring).

  Attributes:
    out_channels: channels of each slot's image (3 for RGB, 1 for grayscale).
    num_slots, num_iterations, slot_size, mlp_hidden, epsilon, scale, update,
      mlp, layer_norm, slot_init, kmeans_iterations, implicit_grad: of the
      slot-attention module ('gaussian' and 'learned' initial slots are made
      here: the slot-attention module takes them as its input).
    symmetric_input: the encoder sees the image mapped from [0, 1] to [-1, 1]
      and the decoder's mixture is mapped back (the paper's pixel range; the
      output stays in the image's range).
    encoder_features: channels of the encoder's convolutions (stride 1, ReLU).
    encoder_kernel: their kernel size.
    decoder_features: channels of the decoder's transposed convolutions.
    decoder_upsamplings: stride-2 transposed convolutions; the slots are
      broadcast at (H, W) / 2**decoder_upsamplings (8x8 at 128x128: the paper's 4).
    decoder_layers: stride-1 transposed convolutions after the upsamplings,
      before the output layer (the paper's CLEVR decoder has 1; its decoder
      for Multi-dSprites and Tetrominoes, broadcast at the full resolution, 3).
    decoder_kernel: their kernel size and the upsamplings' (the paper's 5; the
      output layer's is 3).
    axis_name: the data-parallel axis of the train step, if any: the examples'
      rows in the global batch (which key their slot noise) are counted over it.
    dtype: compute dtype; parameters are float32, the output float32.
  """
  out_channels: int = 3
  num_slots: int = 7
  num_iterations: int = 3
  slot_size: int = 64
  mlp_hidden: int = 128
  epsilon: float = 1e-8
  scale: float = 0.0
  update: str = "gru"
  mlp: bool = True
  layer_norm: bool = True
  slot_init: str = "gaussian"
  kmeans_iterations: int = 5
  implicit_grad: bool = False
  symmetric_input: bool = False
  encoder_features: Sequence[int] = (64, 64, 64, 64)
  encoder_kernel: int = 5
  decoder_features: int = 64
  decoder_upsamplings: int = 4
  decoder_layers: int = 1
  decoder_kernel: int = 5
  axis_name: str | None = None
  dtype: Any = jnp.float32

  def _check_input(self, x: jax.Array, taps: tuple[str, ...]) -> None:
    taps_lib.check_input(x, taps, TAP_NAMES, 2**self.decoder_upsamplings,
                         "decoder_upsamplings")

  def _initial_slots(self, batch: int) -> jax.Array:
    """The initial slots [b, K, slot_size]: `slot_init`'s (the module docstring).

    'gaussian': mu + sigma * noise, the noise keyed by each example's global
    row; 'learned': one learned query per slot; 'kmeans': zeros, a placeholder
    of the slots' shape (the slot-attention module computes them).
    """
    if self.slot_init == "learned":
      queries = self.param("slots_queries", nn.initializers.xavier_uniform(),
                           (1, self.num_slots, self.slot_size), jnp.float32)
      return jnp.broadcast_to(queries, (batch, self.num_slots, self.slot_size)).astype(self.dtype)
    if self.slot_init == "kmeans":
      return jnp.zeros((batch, self.num_slots, self.slot_size), self.dtype)
    mu = self.param("slots_mu", nn.initializers.xavier_uniform(), (1, 1, self.slot_size),
                    jnp.float32)
    log_sigma = self.param("slots_log_sigma", nn.initializers.xavier_uniform(),
                           (1, 1, self.slot_size), jnp.float32)
    key = (self.make_rng("slots") if self.has_rng("slots")
           else jax.random.key(_EVAL_NOISE_SEED))
    first = 0 if self.axis_name is None else jax.lax.axis_index(self.axis_name) * batch
    rows = first + jnp.arange(batch)
    noise = jax.vmap(lambda row: jax.random.normal(
        jax.random.fold_in(key, row), (self.num_slots, self.slot_size), self.dtype))(rows)
    return (mu + jnp.exp(log_sigma) * noise).astype(self.dtype)

  @staticmethod
  def _split_like(value: jax.Array, x: jax.Array) -> jax.Array:
    """`value` [b, ...] split over the mesh like the batch `x` [b, ...].

    Under jit on an explicitly sharded mesh (state.make_mesh) the noise, made
    from constants, would be replicated, and so would every result it enters:
    the evaluation's per-device segmenters expect the batch split. Inside
    shard_map (the train step) arrays are per device: unchanged.
    """
    sharding = _batch_sharding(x)
    return value if sharding is None else jax.sharding.reshard(value, sharding)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               taps: Sequence[str] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """images [b, H, W, C] -> (reconstruction [b, H, W, out_channels] float32, taps).

    `train` changes nothing (no BatchNorm or dropout): it is the U-Net's signature.
    """
    del train
    record = taps_lib.Recorder(taps)
    self._check_input(x, record.names)

    record("input", x)
    b, height, width, _ = x.shape
    conv = lambda features, kernel, name, **kw: nn.Conv(
        features, (kernel, kernel), padding="SAME", dtype=self.dtype,
        param_dtype=jnp.float32, name=name, **kw)
    h = x.astype(self.dtype)
    if self.symmetric_input:
      h = 2 * h - 1
    for i, features in enumerate(self.encoder_features):
      h = nn.relu(conv(features, self.encoder_kernel, f"encoder{i + 1}")(h))
    h = SoftPositionEmbed(self.dtype, name="encoder_position")(h)
    # The paper's per-position MLP after a LayerNorm of the flattened map.
    h = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="encoder_norm")(h)
    h = nn.Dense(self.slot_size, dtype=self.dtype, param_dtype=jnp.float32,
                 name="encoder_mlp1")(h)
    h = nn.Dense(self.slot_size, dtype=self.dtype, param_dtype=jnp.float32,
                 name="encoder_mlp2")(nn.relu(h))
    record("encoder", h)
    _, fh, fw, _ = h.shape

    slots, attention = SlotAttention(
        slot_size=self.slot_size, mlp_hidden=self.mlp_hidden,
        num_iterations=self.num_iterations, epsilon=self.epsilon, scale=self.scale,
        update=self.update, mlp=self.mlp, layer_norm=self.layer_norm, slot_init=self.slot_init,
        kmeans_iterations=self.kmeans_iterations, implicit_grad=self.implicit_grad,
        dtype=self.dtype, name="slot_attention")(h.reshape(b, fh * fw, -1),
                               self._split_like(self._initial_slots(b), x))
    record("attention", jnp.swapaxes(attention, 1, 2).reshape(b, fh, fw, self.num_slots))

    # Spatial broadcast: every slot tiled over a small grid, decoded on its own.
    factor = 2**self.decoder_upsamplings
    gh, gw = height // factor, width // factor
    k = self.num_slots
    d = jnp.broadcast_to(_reshape_batch(slots, (b * k, 1, 1, slots.shape[-1])),
                         (b * k, gh, gw, slots.shape[-1]))
    d = SoftPositionEmbed(self.dtype, name="decoder_position")(d)
    deconv = lambda features, kernel, stride, name: nn.ConvTranspose(
        features, (kernel, kernel), strides=(stride, stride), padding="SAME",
        dtype=self.dtype, param_dtype=jnp.float32, name=name)
    for i in range(self.decoder_upsamplings):
      d = nn.relu(deconv(self.decoder_features, self.decoder_kernel, 2, f"decoder{i + 1}")(d))
    for i in range(self.decoder_upsamplings, self.decoder_upsamplings + self.decoder_layers):
      d = nn.relu(deconv(self.decoder_features, self.decoder_kernel, 1, f"decoder{i + 1}")(d))
    d = deconv(self.out_channels + 1, 3, 1, "decoder_output")(d)
    # The mixture in float32 at least (a float64 network, the device-count
    # comparisons, keeps float64).
    d = _reshape_batch(d, (b, k, height, width, self.out_channels + 1))
    d = d.astype(jnp.promote_types(d.dtype, jnp.float32))
    images, alpha_logits = d[..., :-1], d[..., -1:]
    alphas = jax.nn.softmax(alpha_logits, axis=1)  # over the slots
    out = jnp.sum(alphas * images, axis=1)
    if self.symmetric_input:
      out = (out + 1) / 2
    out = out.astype(jnp.float32)
    record("slot_masks", jnp.moveaxis(alphas[..., 0], 1, -1))
    record("output", out)
    return out, record.taps
