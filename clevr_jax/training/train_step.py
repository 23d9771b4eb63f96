"""The objective, the optimizer and the data-parallel train and eval steps that train.py runs.

The steps follow the pmap programming model (per-device code, named-axis
collectives over `AXIS`) but run as `jax.jit` over `jax.shard_map` on a mesh of
all devices of all processes. Their inputs and outputs are global `jax.Array`s:
the state is replicated, batches are split along their first axis and hold
stored fields (uint8 images and labels: clevr_jax/training/batch.py), which each step
turns into inputs and targets on the devices (`batch.derive`).

The train and eval steps compute their loss with the same functions
(`example_losses`), so the test loss is the train loss on test data.

No TensorFlow here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

from clevr_jax import metrics
from clevr_jax import models
from clevr_jax import schema
from clevr_jax.objects import objectives
from clevr_jax.sharding import AXIS
from clevr_jax.training import batch as batch_lib
from clevr_jax.training import losses
from clevr_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Data = dict[str, jax.Array]  # a device-resident split (batch.DeviceData.arrays), or {}


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  """AdamW on the config's schedule (`total_steps`: the length of a cosine one),
  after clipping the gradient's global norm (`optimizer.grad_clip_norm` > 0)."""
  opt = config.optimizer
  if opt.schedule == "constant":
    schedule = optax.constant_schedule(opt.learning_rate)
  elif opt.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(opt.learning_rate, max(total_steps, 1))
  else:  # 'warmup_exponential' (validate.SCHEDULES)
    # Slot Attention's: a linear warm-up times an exponential decay that runs from
    # step 0 (lr * min(t / warmup, 1) * decay_rate**(t / decay_steps)).
    warmup = optax.linear_schedule(0.0, 1.0, max(opt.warmup_steps, 1))
    decay = optax.exponential_decay(opt.learning_rate, opt.decay_steps, opt.decay_rate)
    schedule = lambda count: warmup(count) * decay(count)
  if opt.warmup_steps and opt.schedule != "warmup_exponential":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), schedule],
        [opt.warmup_steps])
  tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                   weight_decay=opt.weight_decay)
  clip = float(opt.get("grad_clip_norm", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def objective_taps(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Taps (models.tap_names) the objective reads besides the output: none for
  the poster's losses, the shaped tap for the object-aware terms."""
  return objectives.required_taps(config)


def example_losses(config: ml_collections.ConfigDict, output: jax.Array,
                   batch: Batch, axis_name: str | None) -> jax.Array:
  """Each example's data loss [b]: MSE (plain or gray-weighted) or cross-entropy.

  batch["valid"], when present, marks padding: it is left out of the weighted
  loss's group counts (its losses are still computed; callers mask them).
  """
  if config.task == "segmentation":
    return jax.vmap(losses.pixel_cross_entropy)(output, batch["semantic"])
  if config.loss.weighted:
    valid = batch.get("valid")
    weights = losses.inverse_frequency_weights(
        batch["gray_mask"], None if valid is None else valid[:, None, None],
        axis_name=axis_name)
    return jax.vmap(losses.weighted_mse)(output, batch["image"], weights)
  return jax.vmap(losses.mse)(output, batch["image"])


def objective(config: ml_collections.ConfigDict, output: jax.Array,
              taps: dict[str, jax.Array], batch: Batch, axis_name: str | None,
              key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of one (per-device) batch, and its terms for the logs.

  Every example has the same number of pixels, so the mean of the examples'
  losses is the mean over all pixels. With object-aware terms
  (`config.objectives`), `batch` is what `forward_inputs` returns: its 'image'
  holds every view of the examples, stacked ([views * b, ...]; each view
  reconstructs itself), and `taps` are split back per view for the terms.
  The eval step reports the data term only (`example_losses`).
  """
  data = jnp.mean(example_losses(config, output, batch, axis_name))
  terms = {"data_loss": data}
  loss = data
  if objectives.enabled(config):
    n = batch["valid"].shape[0]
    names = objectives.VIEW_NAMES[:output.shape[0] // n]
    by_view = {v: {t: a[i * n:(i + 1) * n] for t, a in taps.items()}
               for i, v in enumerate(names)}
    extra = objectives.objective_terms(config, by_view, batch, axis_name, key)
    loss = loss + extra.pop("total")
    terms |= extra
  return loss, terms


def forward_inputs(config: ml_collections.ConfigDict, batch: Batch, key: jax.Array
                   ) -> Batch:
  """The derived batch with 'image' replaced by the forward pass's input.

  Without object-aware terms, the batch as it is. With them, the views of
  `objectives.prepare_views` (one: the image itself; two: random resized crops)
  stacked along the batch axis, so that one forward pass (one set of BatchNorm
  statistics) sees both, plus what the terms need about the views.
  """
  if not objectives.enabled(config):
    return batch
  n = batch["image"].shape[0]
  batch = {"valid": jnp.ones((n,), bool)} | batch  # training batches have no padding
  images, extra = objectives.prepare_views(config, key, batch)
  stacked = jnp.concatenate([images[v] for v in objectives.VIEW_NAMES if v in images])
  return batch | extra | {"image": stacked}


def _train_step(state: TrainState, batch: Batch, data: Data, *, model: models.UNet,
                tx: optax.GradientTransformation, config: ml_collections.ConfigDict
                ) -> tuple[TrainState, dict[str, jax.Array]]:
  """Per-device code: gradients and BatchNorm statistics averaged over AXIS.

  The loss is averaged over AXIS inside the differentiated function: shard_map
  transposes the replication of the (invariant) parameters into a sum over
  devices, so the gradient of the averaged loss is the global batch's gradient,
  with no separate gradient all-reduce.
  """
  batch = batch_lib.derive(batch_lib.gather(data, batch), config)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  # The views are drawn per example (by its index), and Slot Attention's initial
  # slots per example (by its row in the global batch), from the step's key, so
  # they do not depend on the device split; dropout is drawn per device.
  batch = forward_inputs(config, batch, step_key)
  rng = jax.random.fold_in(step_key, jax.lax.axis_index(AXIS))

  def loss_fn(params):
    (output, taps), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, taps=objective_taps(config), mutable=["batch_stats"],
        rngs={"dropout": rng, "slots": step_key})
    loss, terms = objective(config, output, taps, batch, AXIS, step_key)
    # A network without BatchNorm (Slot Attention) has no statistics to update.
    return jax.lax.pmean(loss, AXIS), (updates.get("batch_stats", state.batch_stats), terms)

  (loss, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  if len(terms) > 1:
    step_metrics |= jax.lax.pmean(terms, AXIS)
  return new_state, step_metrics


def make_train_step(config: ml_collections.ConfigDict, model: models.UNet,
                    tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Jitted data-parallel step(state, batch, data={}); `model` must use axis_name=AXIS.

  `batch` holds stored fields (batch.fields(config, 'train')), or the
  positions of its examples in `data`, a device-resident split. Donates the state.
  """
  step = functools.partial(_train_step, model=model, tx=tx, config=config)
  step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                       out_specs=(P(), P()))

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: TrainState, batch: Batch, data: Data | None = None):
    return step(state, batch, data or {})
  return train_step


def _eval_step(state: TrainState, batch: Batch, *, model: models.UNet,
               config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Per-device sums over valid examples, psum'd: loss_sum, count, confusion."""
  batch = batch_lib.derive(batch, config)
  output, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          batch["image"], train=False)
  valid = batch["valid"]
  per_example = example_losses(config, output, batch, AXIS)
  if config.task == "segmentation":
    confusion = metrics.confusion_matrix(batch["semantic"], jnp.argmax(output, -1),
                                         schema.NUM_SEMANTIC_CLASSES, valid)
  else:
    confusion = jnp.zeros((1, 1), jnp.int32)
  sums = {"loss_sum": jnp.sum(jnp.where(valid, per_example, 0.0)),
          "count": jnp.sum(valid.astype(jnp.float32)), "confusion": confusion}
  return jax.lax.psum(sums, AXIS)


def make_eval_step(config: ml_collections.ConfigDict, model: models.UNet,
                   mesh: jax.sharding.Mesh) -> Callable[[TrainState, Batch], dict[str, Any]]:
  """Jitted eval step on stored fields (batch.fields(config, 'eval_loss'))."""
  step = functools.partial(_eval_step, model=model, config=config)
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))


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
