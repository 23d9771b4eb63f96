"""The train state, its one constructor, and where it lives (the device mesh).

Training, evaluation and the benchmarks all build their state here:
`create_state` (fresh, from the config's seed) or `abstract_state` (shapes
only, the target of a checkpoint restore). Neither compiles anything: the
initial parameters are drawn on the host with NumPy (see `init_variables`).

Where the state lives (the mesh, replicated over it) is clevr_jax/sharding.py.

No TensorFlow here.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clevr_jax import models
from clevr_jax import objectives
from clevr_jax import schema
from clevr_jax import slot_attention



@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # dropout key data; folded with the step and device index


def output_channels(config: ml_collections.ConfigDict) -> int:
  """Channels of the network's output: the config's, or derived from the task."""
  if config.model.out_channels > 0:
    return config.model.out_channels
  if config.task == "segmentation":
    return schema.NUM_SEMANTIC_CLASSES
  return 1 if config.data.grayscale else 3


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  channels = 1 if config.data.grayscale else 3
  return config.data.image_height, config.data.image_width, channels


def make_model(config: ml_collections.ConfigDict, axis_name: str | None = None
               ) -> models.UNet | slot_attention.SlotAttentionAutoEncoder:
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  model_config.out_channels = output_channels(config)
  return models.build_model(ml_collections.ConfigDict({"model": model_config}),
                            axis_name=axis_name)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  opt = config.optimizer
  if opt.schedule == "constant":
    schedule = optax.constant_schedule(opt.learning_rate)
  elif opt.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(opt.learning_rate, max(total_steps, 1))
  elif opt.schedule == "warmup_exponential":
    # Slot Attention's: a linear warm-up times an exponential decay that runs from
    # step 0 (lr * min(t / warmup, 1) * decay_rate**(t / decay_steps)).
    warmup = optax.linear_schedule(0.0, 1.0, max(opt.warmup_steps, 1))
    decay = optax.exponential_decay(opt.learning_rate, opt.decay_steps, opt.decay_rate)
    return optax.adamw(lambda count: warmup(count) * decay(count), b1=opt.b1, b2=opt.b2,
                       eps=opt.eps, weight_decay=opt.weight_decay)
  else:
    raise ValueError(f"config.optimizer.schedule={opt.schedule!r}: use 'constant', "
                     "'cosine' or 'warmup_exponential'")
  if opt.warmup_steps:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), schedule],
        [opt.warmup_steps])
  return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay)


# --- initial values ------------------------------------------------------------

# flax's default kernel initialiser (Conv, ConvTranspose, Dense) is LeCun normal:
# a normal truncated at 2 standard deviations, rescaled so that its standard
# deviation is sqrt(1 / fan_in). This constant is the truncated unit normal's.
_TRUNCATED_STD = 0.87962566103423978


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Unit normal draws truncated to [-2, 2], by redrawing those outside."""
  x = rng.standard_normal(shape)
  outside = np.abs(x) > 2
  while outside.any():
    x[outside] = rng.standard_normal(int(outside.sum()))
    outside = np.abs(x) > 2
  return x


def _initial_leaf(seed: int, path: str, name: str, shape: tuple[int, ...],
                  dtype: Any) -> np.ndarray:
  if name == "kernel":
    fan_in = math.prod(shape[:-1])  # flax: receptive field x input features
    # One stream per leaf, from the seed and the leaf's path: a leaf's values do
    # not depend on which other leaves exist.
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    values = _truncated_normal(rng, shape) * (math.sqrt(1 / fan_in) / _TRUNCATED_STD)
  elif name in ("slots_mu", "slots_log_sigma"):
    # Slot Attention's learned Gaussian [1, 1, d]: Glorot uniform, as the paper's
    # code and flax's xavier_uniform (fan in 1, fan out d).
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    limit = math.sqrt(6 / (math.prod(shape[:-1]) + shape[-1]))
    values = rng.uniform(-limit, limit, shape)
  elif name in ("bias", "mean"):
    values = np.zeros(shape)
  elif name in ("scale", "var"):
    values = np.ones(shape)
  else:
    raise ValueError(f"no initialiser for the variable {path}: add one in state.py")
  return values.astype(dtype)


def init_variables(model: models.UNet, shape: tuple[int, ...], seed: int) -> dict[str, Any]:
  """The model's initial variables, drawn on the host with NumPy.

  Shapes come from `jax.eval_shape` of `model.init` (traced, not compiled);
  values follow flax's default initialisers (LeCun-normal kernels, zero biases,
  unit BatchNorm scales), one NumPy stream per leaf seeded by `seed` and the
  leaf's path. XLA:CPU spent 25-50 s compiling the threefry draws of
  `jax.jit(model.init)` for this network; this takes about half a second
  (mostly tracing) and gives the same values on every backend and process count. (The values differ from
  `model.init`'s; their distribution does not: tests/test_steps.py.)
  """
  abstract = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), jnp.zeros((1,) + tuple(shape), jnp.float32))

  def leaf(path, x):
    key = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    return _initial_leaf(seed, jax.tree_util.keystr(path), key, x.shape, x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, flax.core.unfreeze(abstract))


def create_state(config: ml_collections.ConfigDict,
                 tx: optax.GradientTransformation | None = None) -> TrainState:
  """A fresh state from config.seed, on the host (place it with `sharding.replicate`).

  Without `tx` the optimizer is the config's (its state does not depend on the
  schedule's length).
  """
  tx = tx or make_optimizer(config, 1)
  variables = init_variables(make_model(config), input_shape(config), config.seed)
  params = variables["params"]
  # The dropout key: the seed's second stream (the first drew the parameters).
  rng = np.random.SeedSequence([config.seed, 1]).generate_state(2).astype(np.uint32)
  return TrainState(step=np.zeros((), np.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=jax.device_get(tx.init(params)), rng=rng)


def abstract_state(config: ml_collections.ConfigDict) -> TrainState:
  """The state's shapes and dtypes: what a checkpoint restore fills.

  Evaluation restores into this without building anything itself (the
  optimizer state's shapes follow from the config; drawing the host-side
  initial values takes milliseconds).
  """
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                      create_state(config))


def make_predict_fn(model: models.UNet, taps: tuple[str, ...] = ()
                    ) -> Callable[[TrainState, jax.Array],
                                  tuple[jax.Array, dict[str, jax.Array]]]:
  """Jitted eval-mode forward pass returning the output and the requested taps.

  Plain jit: the batch's sharding propagates, and no collective is needed.
  """
  def predict(state: TrainState, images: jax.Array):
    return model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       images, train=False, taps=taps)
  return jax.jit(predict)
