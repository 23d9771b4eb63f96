"""train_and_evaluate(config, workdir): the training loop, read top to bottom.

Resumes from the newest checkpoint in `workdir` (step, parameters, optimizer
and BatchNorm state, RNG; the data position follows from the step), saves
every `checkpoint_every_steps` and at each epoch's end, evaluates after each
epoch; main.py then runs the full evaluation (`clevr_jax.evaluation`).

Guards: main.py checks the config and takes the workdir's lock; a loss that is
not finite (checked at each log step, where it is fetched anyway, and the state
before each save) stops the run with the last good checkpoint kept; a resumed
run first drops the log records of steps it will run again, and evaluates an
epoch whose final checkpoint was saved but whose evaluation was cut off.
Ctrl-C stops training at the end of the step it interrupts: that step is
logged, saved, and the run resumes after it (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import math
import os
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from clevr_jax import logs
from clevr_jax import metrics
from clevr_jax import models
from clevr_jax import plots
from clevr_jax import sharding
from clevr_jax.data import pipeline
from clevr_jax.objects import self_training
from clevr_jax.training import batch as batch_lib
from clevr_jax.training import checkpoints
from clevr_jax.training import state as state_lib
from clevr_jax.training import train_step as train_step_lib


class TrainingDiverged(ValueError):
  """The loss (or the state about to be saved) is no longer finite."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _diverged(config: ml_collections.ConfigDict, manager, step: int, what: str
              ) -> TrainingDiverged:
  checkpoints.finish(manager)
  last = manager.latest_step()
  lr = config.optimizer.learning_rate
  kept = (f"the checkpoint of step {last} is the last good state and is kept"
          if last is not None else "no checkpoint was saved")
  return TrainingDiverged(
      f"training diverged at step {step}: {what}. Stopped without saving that state; "
      f"{kept}. Lower the learning rate (now {lr:g}; e.g. "
      f"--config.optimizer.learning_rate={lr / 10:g}) or warm it up "
      "(--config.optimizer.warmup_steps=100)"
      + (", or compute in float32 (--config.model.dtype=float32)"
         if config.model.dtype != "float32" else "")
      + ", then run again "
      + ("(it resumes from that checkpoint)." if last is not None else "."))


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Process 0 builds the dataset if needed; the others wait for it."""
  if jax.process_index() == 0:
    pipeline.prepare(config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")


def evaluate_epoch(config: ml_collections.ConfigDict, state: state_lib.TrainState,
                   eval_step, split: pipeline.Split, mesh: jax.sharding.Mesh
                   ) -> dict[str, float]:
  """Test loss (and supervised pixel metrics) over the whole test split."""
  totals = None
  for host_batch in split.eval_batches(process_index=jax.process_index(),
                                       process_count=jax.process_count(),
                                       fields=batch_lib.fields(config, "eval_loss")):
    sums = eval_step(state, sharding.to_global(host_batch, mesh))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  totals = jax.tree.map(np.asarray, totals)
  result = {"test/loss": float(totals["loss_sum"] / totals["count"])}
  if config.task == "segmentation":
    scores = metrics.confusion_metrics(totals["confusion"])
    result["test/pixel_accuracy"] = float(scores.pixel_accuracy)
    result["test/mean_iou"] = float(scores.mean_iou)
  return result


def write_preview(config: ml_collections.ConfigDict, path: str, state: state_lib.TrainState,
                  predict, split: pipeline.Split, mesh: jax.sharding.Mesh) -> None:
  host_batch = next(split.eval_batches(process_index=jax.process_index(),
                                       process_count=jax.process_count(),
                                       fields=("image", "labels", "shape")))
  batch = batch_lib.make_derive(config)(sharding.to_global(host_batch, mesh))
  output, _ = predict(state, batch["image"])
  n = config.num_preview_images
  images, outputs = sharding.to_host(batch["image"])[:n], sharding.to_host(output)[:n]
  semantic = sharding.to_host(batch["semantic"])[:n]
  if jax.process_index() == 0:
    plots.save_preview(path, images, outputs, config.task, semantic)


class _StopAtStepEnd:
  """Until `remove()`, the first SIGINT (Ctrl-C) asks the loop to stop after its step."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():  # where signals arrive
      self._previous = signal.signal(signal.SIGINT, self._request)

  def _request(self, signum, frame) -> None:
    del signum, frame
    self.requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one stops at once
    logging.warning("Ctrl-C: stopping after this step (press it again to stop at once)")

  def remove(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the configured model in `workdir`; returns the last test metrics.

  The config is checked (`validate.check_config`) and the workdir locked by the caller.
  """
  is_chief = jax.process_index() == 0
  prepare_data(config)
  train_split = pipeline.Split(config, "train")
  test_split = pipeline.Split(config, "test")

  steps_per_epoch = train_split.steps_per_epoch(config.batch_size)
  # num_train_steps > 0 (a step budget, e.g. Slot Attention's 500k) overrides the
  # epochs; the last epoch may then stop part-way.
  total_steps = config.get("num_train_steps", 0) or steps_per_epoch * config.num_epochs
  num_epochs = -(-total_steps // steps_per_epoch)
  mesh = sharding.make_mesh()
  model = models.make_model(config, axis_name=sharding.AXIS)
  tx = train_step_lib.make_optimizer(config, total_steps)
  state = state_lib.create_state(config, tx)
  manager = checkpoints.make_manager(workdir, config)
  if manager.latest_step() is not None:
    state, damaged = checkpoints.restore_newest(manager, state, mesh)
    if is_chief:
      checkpoints.set_aside(manager, damaged)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
      manager.reload()
    logging.info("Resumed from the checkpoint of step %d in %s", int(state.step), workdir)
  else:
    state = sharding.replicate(state, mesh)
  if is_chief:  # the steps after the checkpoint run again: log them once
    dropped = logs.drop_records_after(workdir, int(state.step))
    if dropped:
      logging.info("Dropped %d record(s) of metrics.jsonl logged after step %d",
                   dropped, int(state.step))
  train_step = train_step_lib.make_train_step(config, model, tx, mesh)
  eval_step = train_step_lib.make_eval_step(config, model, mesh)
  predict = train_step_lib.make_predict_fn(models.make_model(config))
  store = self_training.load_pseudo_masks(config, workdir, train_split)
  if store is not None:
    train_split.attach_pseudo_masks(store)
  fields = batch_lib.fields(config, "train")
  # The training split on the devices once (config.data.device_resident): each
  # step then gets its examples' positions only. Otherwise sent per step.
  device_data = None
  if config.data.device_resident:
    device_data = batch_lib.DeviceData(train_split.train_arrays(fields), mesh)
    logging.info("Training split on the devices: %.2f GB per device",
                 device_data.nbytes() / 1e9)

  writer = logs.MetricWriter(workdir, enabled=is_chief)
  step = int(state.step)
  throughput = logs.Throughput(config.batch_size, total_steps, step)
  logging.info("Training %s for %d steps (%d epochs of %d) on %d devices, global batch %d",
               config.name, total_steps, num_epochs, steps_per_epoch,
               jax.device_count(), config.batch_size)
  test_metrics: dict[str, float] = {}

  def end_epoch(epoch: int) -> dict[str, float]:
    """The epoch's test metrics (logged) and preview."""
    result = evaluate_epoch(config, state, eval_step, test_split, mesh)
    logging.info("epoch %d  %s", epoch + 1,
                 "  ".join(f"{k} {v:.5f}" for k, v in result.items()))
    writer.write(step, result | {"epoch": epoch + 1})
    os.makedirs(os.path.join(workdir, "previews"), exist_ok=True)
    write_preview(config, os.path.join(workdir, "previews", f"epoch_{epoch + 1:03d}.png"),
                  state, predict, test_split, mesh)
    return result

  def save_if_finite() -> None:
    if not bool(_all_finite(state)):
      raise _diverged(config, manager, step, "the parameters or optimizer state are not "
                      "finite")
    checkpoints.save(manager, state)

  stop = _StopAtStepEnd()
  try:
    if (step and (step % steps_per_epoch == 0 or step == total_steps)
        and _evaluation_missing(workdir, step)):
      # Killed after the epoch's final checkpoint, before its evaluation.
      test_metrics = end_epoch((step - 1) // steps_per_epoch)
    for epoch in range(step // steps_per_epoch, num_epochs):
      if step >= total_steps:
        break
      where = dict(skip_batches=step - epoch * steps_per_epoch,
                   process_index=jax.process_index(), process_count=jax.process_count())
      batches = train_split.train_batches(epoch, fields=fields,
                                          positions_only=device_data is not None, **where)
      data = device_data.arrays if device_data is not None else None
      for host_batch in batches:
        state, train_metrics = train_step(state, sharding.to_global(host_batch, mesh), data)
        step += 1
        if step % config.log_every_steps == 0 or step == total_steps:
          train_metrics = {f"train/{k}": float(v) for k, v in train_metrics.items()}
          bad = {k: v for k, v in train_metrics.items() if not math.isfinite(v)}
          if bad:
            raise _diverged(config, manager, step, ", ".join(  # the loss first
                f"{k.removeprefix('train/')} is {v}" for k, v in sorted(
                    bad.items(), key=lambda item: item[0] != "train/loss")))
          images_per_second, left = throughput.update(step)
          logging.info("step %d/%d  epoch %d  loss %.5f  %.1f images/s  %s left",
                       step, total_steps, epoch + 1, train_metrics["train/loss"],
                       images_per_second, logs.format_duration(left))
          writer.write(step, train_metrics | {"train/images_per_second": images_per_second})
        if step % config.checkpoint_every_steps == 0:
          save_if_finite()
        if stop.requested:
          raise KeyboardInterrupt
        if step == total_steps:
          break
      save_if_finite()
      test_metrics = end_epoch(epoch)
      if stop.requested:
        raise KeyboardInterrupt
  except KeyboardInterrupt:
    if manager.latest_step() != step and bool(_all_finite(state)):
      logging.warning("Interrupted: saving step %d before exiting", step)
      checkpoints.save(manager, state, force=True)
    raise
  finally:
    stop.remove()
    writer.close()
    checkpoints.close(manager)
  if not test_metrics:  # resumed a finished run: report its figures again
    test_metrics = evaluate_epoch(config, state, eval_step, test_split, mesh)
  return test_metrics


def _evaluation_missing(workdir: str, step: int) -> bool:
  """Whether the log lacks the test metrics of the epoch that ends at `step`
  (decided by process 0, so that every process runs the same collectives)."""
  missing = jax.process_index() == 0 and not any(
      "test/loss" in r and r["step"] == step for r in logs.read_metrics(workdir))
  if jax.process_count() > 1:
    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing
