"""The poster's U-Net and Auto-Encoder: one flax.linen network with a skip switch.

Layout is NHWC. With `skip=True` the decoder concatenates the encoder block of
the same resolution (U-Net); with `skip=False` it does not, so everything the
decoder sees passes through the bottleneck (Auto-Encoder). Intermediate
activations ("taps") are returned by name for clustering.

This module imports neither TensorFlow nor `clevr_jax.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clevr_jax import schema
from clevr_jax.models import slot_attention
from clevr_jax.models import taps as taps_lib

# PyTorch's BatchNorm epsilon (the poster's code); flax's default happens to match.
_BN_EPSILON = 1e-5

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def tap_names(depth: int = 4, embedding: bool = False) -> tuple[str, ...]:
  """Names of the taps of a network with `depth` down-samplings, in forward order.

  With `embedding`, the embedding head's output comes last as 'embedding'.
  """
  encoder = tuple(f'enc{i}' for i in range(1, depth + 1))
  decoder = tuple(f'dec{i}' for i in range(1, depth + 1))
  return ('input', *encoder, 'bottleneck', *decoder, 'output') + (
      ('embedding',) if embedding else ())


ARCHITECTURES = ('unet', 'slot_attention')


def architecture(config: ml_collections.ConfigDict) -> str:
  """config.model.architecture (absent: the U-Net), checked."""
  name = config.model.get('architecture', 'unet')
  if name not in ARCHITECTURES:
    raise ValueError(f'config.model.architecture={name!r} is not one of {ARCHITECTURES}')
  return name


def config_tap_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The taps of the network that `config.model` describes."""
  if architecture(config) == 'slot_attention':
    return slot_attention.TAP_NAMES
  return tap_names(int(config.model.depth), int(config.model.get('embedding_dim', 0)) > 0)


def size_factor(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(what the image height and width must be divisible by, the field that sets it)."""
  if architecture(config) == 'slot_attention':
    return (2**int(config.model.slot_attention.decoder_upsamplings),
            'config.model.slot_attention.decoder_upsamplings')
  return 2**int(config.model.depth), 'config.model.depth'


TAP_NAMES = tap_names(4)


class ConvBlock(nn.Module):
  """(BatchNorm -> 3x3 conv -> ReLU) twice; normalising before each conv as the poster did."""
  features: int
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in (1, 2):
      x = nn.BatchNorm(
          use_running_average=not train,
          momentum=self.bn_momentum,
          epsilon=_BN_EPSILON,
          axis_name=self.axis_name,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=f'norm{i}')(x)
      x = nn.Conv(
          self.features, (3, 3), padding='SAME', use_bias=True,
          dtype=self.dtype, param_dtype=jnp.float32, name=f'conv{i}')(x)
      x = nn.relu(x)
    return x


def sincos_position_code(height: int, width: int, channels: int) -> jax.Array:
  """Fixed 2-D sine-cosine position code [height * width, channels].

  Half the channels code the row, half the column, each as sines and cosines
  of the normalised position at frequencies from pi to 64 pi. No
  parameters, so the network still takes images of any size.
  """
  if channels % 4:
    raise ValueError(f'attention needs channels divisible by 4; got {channels}')
  quarter = channels // 4
  freqs = math.pi * jnp.geomspace(1.0, 64.0, quarter, dtype=jnp.float32)
  y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  yy, xx = jnp.meshgrid(y, x, indexing='ij')
  angles_y = yy.reshape(-1, 1) * freqs
  angles_x = xx.reshape(-1, 1) * freqs
  return jnp.concatenate([jnp.sin(angles_y), jnp.cos(angles_y),
                          jnp.sin(angles_x), jnp.cos(angles_x)], axis=-1)


class SelfAttentionBlock(nn.Module):
  """Pre-norm transformer block over the pixels of a feature map (global mixing).

  tokens + MHSA(LN(tokens + position)), then + MLP(LN(.)). The position code
  enters the attention's input only, so the residual stream stays the
  convolutional features.
  """
  num_heads: int
  mlp_ratio: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    position = sincos_position_code(h, w, c).astype(tokens.dtype)
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name='norm1')(tokens)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        name='attention')(y + position, y + position, y)
    tokens = tokens + y
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name='norm2')(tokens)
    y = nn.Dense(self.mlp_ratio * c, dtype=self.dtype, param_dtype=jnp.float32,
                 name='mlp1')(y)
    y = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name='mlp2')(nn.gelu(y))
    return (tokens + y).reshape(b, h, w, c)


class UNet(nn.Module):
  """U-Net (`skip=True`) or Auto-Encoder (`skip=False`) with named taps.

  Attributes:
    out_channels: channels of the final 3x3 conv (3 to reconstruct RGB, 1 for
      grayscale, the number of classes for the supervised head).
    base_width: channels of the first encoder block; block i has
      base_width * 2**(i-1), the bottleneck base_width * 2**depth.
    depth: number of 2x2 down-samplings; input height and width must be
      divisible by 2**depth.
    skip: concatenate encoder features into the decoder (U-Net) or not (AE).
    dropout_rate: dropout after every block when > 0 (needs a 'dropout' rng
      when training).
    bn_momentum: running-average momentum in flax's convention; 0.9 equals
      PyTorch's momentum=0.1. Flax's default 0.99 leaves the running stats of a
      short run far from the data, which spoils eval-mode outputs.
    axis_name: data-parallel axis (pmap / shard_map) over which BatchNorm
      averages its batch statistics; None on a single device.
    dtype: compute dtype; parameters are always float32 and the output is
      returned as float32.
    attention_blocks: self-attention blocks after the bottleneck block (0 =
      none, the poster's network); the 'bottleneck' tap is their output.
    attention_heads, attention_mlp_ratio: of each attention block.
    embedding_tap: the tap the embedding head reads (when embedding_dim > 0).
    embedding_dim: channels of a 1x1-conv embedding head returned as the tap
      'embedding'; 0 = no head.
  """
  out_channels: int
  base_width: int = 8
  depth: int = 4
  skip: bool = True
  dropout_rate: float = 0.0
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Any = jnp.float32
  attention_blocks: int = 0
  attention_heads: int = 4
  attention_mlp_ratio: int = 2
  embedding_tap: str = 'dec4'
  embedding_dim: int = 0

  def _block(self, x: jax.Array, features: int, name: str, train: bool) -> jax.Array:
    x = ConvBlock(features, bn_momentum=self.bn_momentum,
                  axis_name=self.axis_name, dtype=self.dtype, name=name)(x, train=train)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x

  def _check_input(self, x: jax.Array, taps: tuple[str, ...]) -> None:
    valid = tap_names(self.depth, self.embedding_dim > 0)
    if self.embedding_dim > 0 and self.embedding_tap not in tap_names(self.depth):
      raise ValueError(f'embedding_tap={self.embedding_tap!r} is not one of '
                       f'{list(tap_names(self.depth))}')
    taps_lib.check_input(x, taps, valid, 2**self.depth, 'depth')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               taps: Sequence[str] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the network.

    Args:
      x: images [batch, height, width, channels].
      train: batch statistics and dropout (True) or running statistics (False).
        When True, apply with `mutable=['batch_stats']`.
      taps: names from `tap_names(depth)` to return; must be static under jit.

    Returns:
      (output [batch, height, width, out_channels] float32, {tap name: float32
      activation [batch, h, w, c]} holding only the requested taps).
    """
    recorder = taps_lib.Recorder(taps)
    self._check_input(x, recorder.names)

    def record(name: str, value: jax.Array) -> None:
      recorder(name, value)
      if self.embedding_dim > 0 and name == self.embedding_tap:
        # Always built (so init creates its parameters); jit drops it when unused.
        recorder('embedding', nn.Conv(self.embedding_dim, (1, 1), dtype=self.dtype,
                                      param_dtype=jnp.float32, name='embedding_head')(value))

    record('input', x)
    h = x
    skips = []
    for i in range(1, self.depth + 1):
      if i > 1:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      h = self._block(h, self.base_width * 2**(i - 1), f'enc{i}', train)
      record(f'enc{i}', h)
      skips.append(h)

    if self.depth > 0:
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = self._block(h, self.base_width * 2**self.depth, 'bottleneck', train)
    for i in range(self.attention_blocks):
      h = SelfAttentionBlock(self.attention_heads, self.attention_mlp_ratio,
                             dtype=self.dtype, name=f'attention{i + 1}')(h)
    record('bottleneck', h)

    for j in range(1, self.depth + 1):
      features = self.base_width * 2**(self.depth - j)
      h = nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID',
                           dtype=self.dtype, param_dtype=jnp.float32,
                           name=f'up{j}')(h)
      if self.skip:
        h = jnp.concatenate([h, skips[-j].astype(h.dtype)], axis=-1)
      h = self._block(h, features, f'dec{j}', train)
      record(f'dec{j}', h)

    out = nn.Conv(self.out_channels, (3, 3), padding='SAME', use_bias=True,
                  dtype=self.dtype, param_dtype=jnp.float32, name='output')(h)
    out = out.astype(jnp.float32)
    record('output', out)
    return out, recorder.taps


def build_model(config: ml_collections.ConfigDict, *,
                axis_name: str | None = None) -> UNet | slot_attention.SlotAttentionAutoEncoder:
  """The network described by `config.model`: `architecture` picks it.

  'slot_attention' reads `out_channels`, `dtype` and `slot_attention.*`
  (clevr_jax/models/slot_attention.py). The U-Net reads `skip`, `base_width`, `depth`, `dropout_rate`, `bn_momentum`, `dtype`
  ('float32' or 'bfloat16'), `out_channels`, and (absent: off)
  `attention_blocks`, `attention_heads`, `attention_mlp_ratio`,
  `embedding_tap`, `embedding_dim`. `axis_name` is the
  data-parallel axis of the train step, if any (not a config field: it
  belongs to how the step is run, not to the model).
  """
  m = config.model
  if m.dtype not in _DTYPES:
    raise ValueError(f'config.model.dtype must be one of {sorted(_DTYPES)}; got {m.dtype!r}')
  if architecture(config) == 'slot_attention':
    sa = m.slot_attention
    if sa.update_rule not in slot_attention.UPDATES:
      raise ValueError(f'config.model.slot_attention.update_rule={sa.update_rule!r} is not one of '
                       f'{slot_attention.UPDATES}')
    if sa.get('init', 'gaussian') not in slot_attention.INITS:
      raise ValueError(f'config.model.slot_attention.init={sa.init!r} is not one of '
                       f'{slot_attention.INITS}')
    return slot_attention.SlotAttentionAutoEncoder(
        out_channels=int(m.out_channels), num_slots=int(sa.num_slots),
        num_iterations=int(sa.num_iterations), slot_size=int(sa.slot_size),
        mlp_hidden=int(sa.mlp_hidden), epsilon=float(sa.epsilon), scale=float(sa.scale),
        update=str(sa.update_rule), mlp=bool(sa.mlp), layer_norm=bool(sa.layer_norm),
        slot_init=str(sa.get('init', 'gaussian')),
        kmeans_iterations=int(sa.get('kmeans_iterations', 5)),
        implicit_grad=bool(sa.get('implicit_grad', False)),
        symmetric_input=bool(sa.get('symmetric_input', False)),
        encoder_features=tuple(int(f) for f in sa.encoder_features),
        encoder_kernel=int(sa.encoder_kernel), decoder_features=int(sa.decoder_features),
        decoder_upsamplings=int(sa.decoder_upsamplings),
        decoder_layers=int(sa.get('decoder_layers', 1)),
        decoder_kernel=int(sa.decoder_kernel), axis_name=axis_name, dtype=_DTYPES[m.dtype])
  return UNet(
      out_channels=int(m.out_channels),
      base_width=int(m.base_width),
      depth=int(m.depth),
      skip=bool(m.skip),
      dropout_rate=float(m.dropout_rate),
      bn_momentum=float(m.bn_momentum),
      axis_name=axis_name,
      dtype=_DTYPES[m.dtype],
      attention_blocks=int(m.get('attention_blocks', 0)),
      attention_heads=int(m.get('attention_heads', 4)),
      attention_mlp_ratio=int(m.get('attention_mlp_ratio', 2)),
      embedding_tap=str(m.get('embedding_tap', 'dec4')),
      embedding_dim=int(m.get('embedding_dim', 0)),
  )


def output_channels(config: ml_collections.ConfigDict) -> int:
  """Channels of the network's output: the config's, or derived from the task."""
  if config.model.out_channels > 0:
    return config.model.out_channels
  if config.task == 'segmentation':
    return schema.NUM_SEMANTIC_CLASSES
  return 1 if config.data.grayscale else 3


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """One input image's shape, [H, W, C]."""
  channels = 1 if config.data.grayscale else 3
  return config.data.image_height, config.data.image_width, channels


def make_model(config: ml_collections.ConfigDict, axis_name: str | None = None
               ) -> UNet | slot_attention.SlotAttentionAutoEncoder:
  """The run's network: `config.model`, with its output channels from the task."""
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  model_config.out_channels = output_channels(config)
  return build_model(ml_collections.ConfigDict({'model': model_config}), axis_name=axis_name)


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct).

  Pass `variables['params']`: the whole variable dict would also count
  BatchNorm's running statistics, which are not trained.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
