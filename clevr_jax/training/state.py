"""The train state and its one constructor (flax's own initialisers).

Training, evaluation and the benchmarks all build their state here:
`create_state` (fresh, from the config's seed: flax's own initialisers) or
`abstract_state` (shapes only, the target of a checkpoint restore; without an
optimizer, the network's part only). The optimizer lives with the step
(train_step.make_optimizer).

Where the state lives (the mesh, replicated over it) is clevr_jax/sharding.py.

No TensorFlow here.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clevr_jax import models


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # dropout key data; folded with the step and device index


def init_variables(model: flax.linen.Module, shape: tuple[int, ...], seed: int) -> dict[str, Any]:
  """The model's initial variables from flax's own initialisers, on the host.

  `jax.jit(model.init)` on one zero image of `shape`. Its random draws use
  threefry outside its partitionable mode: XLA:CPU compiles and runs the poster
  U-Net's initialiser in 5.5 CPU seconds that way against 20.9 in the (default)
  partitionable mode (docs/reports/2026-12-07-house.md; wall-clock figures:
  docs/reports/2026-12-06-parameter-initialisation.md). The values differ
  between the two modes, their distribution does not. The switch holds on every
  backend, so a CPU and an accelerator draw the same initial parameters.
  """
  init = jax.jit(functools.partial(model.init, train=False))
  with jax.threefry_partitionable(False):
    variables = init(jax.random.key(seed), jnp.zeros((1,) + tuple(shape), jnp.float32))
  return jax.device_get(flax.core.unfreeze(variables))


def _dropout_key(seed: int) -> np.ndarray:
  """The dropout key's data: the seed's second stream (the first drew the parameters)."""
  return np.random.SeedSequence([seed, 1]).generate_state(2).astype(np.uint32)


def create_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation
                 ) -> TrainState:
  """A fresh state from config.seed, on the host (place it with `sharding.replicate`).

  `tx` is the step's optimizer (train_step.make_optimizer).
  """
  variables = init_variables(models.make_model(config), models.input_shape(config),
                             config.seed)
  params = variables["params"]
  return TrainState(step=np.zeros((), np.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=jax.device_get(tx.init(params)), rng=_dropout_key(config.seed))


def abstract_state(config: ml_collections.ConfigDict,
                   tx: optax.GradientTransformation | None = None) -> TrainState:
  """The state's shapes and dtypes, what a checkpoint restore fills: traced, not compiled.

  Without `tx`, the network's state only (no optimizer state: `opt_state` is
  None), what a restore for prediction fills. The optimizer state's shapes do
  not depend on the schedule's length, so any `train_step.make_optimizer(config,
  n)` will do.
  """
  model = models.make_model(config)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1,) + models.input_shape(config), jnp.float32))
  variables = flax.core.unfreeze(variables)
  params = variables["params"]
  return TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=None if tx is None else jax.eval_shape(tx.init, params),
                    rng=jax.ShapeDtypeStruct((2,), np.uint32))
