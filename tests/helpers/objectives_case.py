"""A small batch on which every objective term is on: shared by
tests/test_objectives.py and its multi-device child (objectives_devices.py).
Arrays take JAX's default float dtype (float64 under jax_enable_x64)."""

import functools

import jax
import jax.numpy as jnp

from clevr_jax import defaults
from clevr_jax.objects import objectives

H, W = 8, 12  # the images; the embeddings are at half this size
CHANNELS, DIM = 6, 5


def make_case(batch_size: int = 8, queries: str = "pixel", impl: str = "rbg"):
  """(config, projection [CHANNELS, DIM], features {view: [B, H/2, W/2, CHANNELS]},
  batch with the additions of `objectives.prepare_views`); the last example is
  padding (valid False). `impl`: the PRNG of the views' random draws ('rbg'
  compiles fast, but only threefry promises the same draws under shard_map)."""
  _key = functools.partial(jax.random.key, impl=impl)
  config = defaults.get_config("test")
  config.model.embedding_dim = DIM
  obj = config.objectives
  obj.discriminative.weight = 1.0
  obj.mask_infonce.weight = 0.5
  obj.mask_infonce.queries = queries
  obj.mask_infonce.num_pixel_queries = 7
  obj.view_infonce.weight = 0.25
  obj.view_infonce.num_points = 9
  obj.pseudo_masks.max_labels = 5
  keys = jax.random.split(_key(0), 5)
  batch = {
      "image": jax.random.uniform(keys[0], (batch_size, H, W, 3)),
      "valid": jnp.arange(batch_size) < batch_size - 1,
      "index": jnp.arange(batch_size) * 3 + 1,
      # Blocks of 2x2 pixels share a label, so the majority downsampling keeps
      # every mask; label 5 (>= max_labels) belongs to no mask.
      "pseudo_labels": jnp.repeat(jnp.repeat(jax.random.randint(
          keys[1], (batch_size, H // 2, W // 2), 0, 6), 2, axis=1), 2, axis=2),
  }
  # Jitted: one compilation instead of one per operation (eager), far faster on a CPU.
  _, extra = jax.jit(lambda k, b: objectives.prepare_views(config, k, b))(keys[2], batch)
  features = {v: jax.random.normal(k, (batch_size, H // 2, W // 2, CHANNELS))
              for v, k in zip("ab", keys[3:])}
  projection = jax.random.normal(_key(9), (CHANNELS, DIM)) / CHANNELS**0.5
  return config, projection, features, batch | extra
