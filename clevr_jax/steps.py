"""Train state, objectives and the data-parallel steps. No TensorFlow here.

The steps follow the pmap programming model (per-device code, named-axis
collectives over `AXIS`) but run as `jax.jit` over `jax.shard_map` on a mesh of
all devices of all processes. Their inputs and outputs are global `jax.Array`s:
the state is replicated, batches are split along their first axis. Orbax can
save such arrays from any number of processes, and a state saved on 4 devices
restores on 1 or 2, which pmap's host-local outputs do not allow.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from clevr_jax import losses
from clevr_jax import models
from clevr_jax import schema

AXIS = "batch"  # the data-parallel mesh axis
TASKS = ("reconstruction", "segmentation")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # dropout; folded with the step and device index


def output_channels(config: ml_collections.ConfigDict) -> int:
  """Channels of the network's output: the config's, or derived from the task."""
  if config.model.out_channels > 0:
    return config.model.out_channels
  if config.task == "segmentation":
    return schema.NUM_SEMANTIC_CLASSES
  return 1 if config.data.grayscale else 3


def check_config(config: ml_collections.ConfigDict) -> None:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {TASKS}")
  if config.task == "segmentation" and config.loss.weighted:
    raise ValueError("config.loss.weighted applies to reconstruction only")


def make_model(config: ml_collections.ConfigDict, axis_name: str | None = None
               ) -> models.UNet:
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
  else:
    raise ValueError(f"config.optimizer.schedule={opt.schedule!r}: use 'constant' or 'cosine'")
  if opt.warmup_steps:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), schedule],
        [opt.warmup_steps])
  return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay)


def init_state(config: ml_collections.ConfigDict, model: models.UNet,
               tx: optax.GradientTransformation, input_shape: tuple[int, ...]
               ) -> TrainState:
  """A fresh state from config.seed (host-side; replicate with `replicate`)."""
  init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
  variables = jax.jit(functools.partial(model.init, train=False))(
      init_key, jnp.zeros((1,) + tuple(input_shape), jnp.float32))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params), rng=jax.random.key_data(dropout_key))


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  channels = 1 if config.data.grayscale else 3
  return config.data.image_height, config.data.image_width, channels


def to_host(x: jax.Array) -> np.ndarray:
  """A global array, gathered whole onto every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), (AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def global_batch(host_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh
                 ) -> dict[str, jax.Array]:
  """Host batch [local_devices, per_device, ...] -> global arrays split over AXIS."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(
      sharding, v.reshape((-1,) + v.shape[2:])) for k, v in host_batch.items()}


def objective(config: ml_collections.ConfigDict, output: jax.Array,
              batch: dict[str, jax.Array], axis_name: str | None) -> jax.Array:
  """The training loss of one (per-device) batch."""
  if config.task == "segmentation":
    return losses.pixel_cross_entropy(output, batch["semantic"])
  if config.loss.weighted:
    weights = losses.inverse_frequency_weights(batch["gray_mask"], axis_name=axis_name)
    return losses.weighted_mse(output, batch["image"], weights)
  return losses.mse(output, batch["image"])


def _train_step(state: TrainState, batch: dict[str, jax.Array], *,
                model: models.UNet, tx: optax.GradientTransformation,
                config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """Per-device code: gradients and BatchNorm statistics averaged over AXIS.

  The loss is averaged over AXIS inside the differentiated function: shard_map
  transposes the replication of the (invariant) parameters into a sum over
  devices, so the gradient of the averaged loss is the global batch's gradient,
  with no separate gradient all-reduce.
  """
  rng = jax.random.fold_in(jax.random.fold_in(
      jax.random.wrap_key_data(state.rng), state.step), jax.lax.axis_index(AXIS))

  def loss_fn(params):
    output, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    loss = jax.lax.pmean(objective(config, output[0], batch, AXIS), AXIS)
    return loss, updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def make_train_step(config: ml_collections.ConfigDict, model: models.UNet,
                    tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Jitted data-parallel step; `model` must use axis_name=AXIS. Donates the state."""
  step = functools.partial(_train_step, model=model, tx=tx, config=config)
  step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=(0,))


def _eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.UNet,
               config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Per-device sums over valid examples, psum'd: [loss_sum, count] and the
  supervised confusion matrix."""
  output, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          batch["image"], train=False)
  valid = batch["valid"].astype(jnp.float32)
  if config.task == "segmentation":
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(output, batch["semantic"])
    per_example = per_pixel.mean(axis=(1, 2))
    pred = jnp.argmax(output, -1)
    n = schema.NUM_SEMANTIC_CLASSES
    pairs = batch["semantic"] * n + pred
    weights = jnp.broadcast_to(valid[:, None, None], pairs.shape)
    confusion = jnp.zeros(n * n, jnp.float32).at[pairs.reshape(-1)].add(
        weights.reshape(-1)).reshape(n, n)
  else:
    weights = None
    if config.loss.weighted:
      weights = losses.inverse_frequency_weights(
          batch["gray_mask"], batch["valid"][:, None, None], axis_name=AXIS)
    err = jnp.square(output - batch["image"])
    if weights is not None:
      err = err * weights[..., None]
    per_example = err.mean(axis=(1, 2, 3))
    confusion = jnp.zeros((1, 1), jnp.float32)
  sums = {"loss_sum": jnp.sum(per_example * valid), "count": jnp.sum(valid),
          "confusion": confusion}
  return jax.lax.psum(sums, AXIS)


def make_eval_step(config: ml_collections.ConfigDict, model: models.UNet,
                   mesh: jax.sharding.Mesh
                   ) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
  step = functools.partial(_eval_step, model=model, config=config)
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))


def make_predict_fn(model: models.UNet, taps: tuple[str, ...] = ()
                    ) -> Callable[[TrainState, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
  """Jitted eval-mode forward pass returning the output and the requested taps.

  Plain jit: the batch's sharding propagates, and no collective is needed.
  """
  def predict(state: TrainState, images: jax.Array):
    return model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       images, train=False, taps=taps)
  return jax.jit(predict)
