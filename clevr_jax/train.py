"""train_and_evaluate(config, workdir): the training loop, read top to bottom.

Resumes from the newest checkpoint in `workdir` (step, parameters, optimizer
and BatchNorm state, RNG; the data position follows from the step), saves
every `checkpoint_every_steps` and at each epoch's end, evaluates after each
epoch; main.py then runs the full evaluation (`clevr_jax.evaluation`).
"""

from __future__ import annotations

import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from clevr_jax import checkpoints
from clevr_jax import logs
from clevr_jax import metrics
from clevr_jax import plots
from clevr_jax import steps
from clevr_jax.data import pipeline
from clevr_jax import schema


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Process 0 builds the dataset if needed; the others wait for it."""
  if jax.process_index() == 0:
    pipeline.prepare(config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")


def evaluate_epoch(config: ml_collections.ConfigDict, state: steps.TrainState,
                   eval_step, split: pipeline.Split, mesh: jax.sharding.Mesh
                   ) -> dict[str, float]:
  """Test loss (and supervised pixel metrics) over the whole test split."""
  totals = None
  for host_batch in split.eval_batches(process_index=jax.process_index(),
                                       process_count=jax.process_count(),
                                       local_devices=jax.local_device_count()):
    sums = eval_step(state, steps.global_batch(host_batch, mesh))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  totals = jax.tree.map(np.asarray, totals)
  result = {"test/loss": float(totals["loss_sum"] / totals["count"])}
  if config.task == "segmentation":
    scores = metrics.confusion_metrics(totals["confusion"])
    result["test/pixel_accuracy"] = float(scores.pixel_accuracy)
    result["test/mean_iou"] = float(scores.mean_iou)
  return result


def write_preview(config: ml_collections.ConfigDict, path: str, state: steps.TrainState,
                  predict, split: pipeline.Split, mesh: jax.sharding.Mesh) -> None:
  host_batch = next(split.eval_batches(process_index=jax.process_index(),
                                       process_count=jax.process_count(),
                                       local_devices=jax.local_device_count()))
  batch = steps.global_batch(host_batch, mesh)
  output, _ = predict(state, batch["image"])
  n = config.num_preview_images
  images, outputs = steps.to_host(batch["image"])[:n], steps.to_host(output)[:n]
  semantic = steps.to_host(batch["semantic"])[:n]
  if jax.process_index() == 0:
    plots.save_preview(path, images, outputs, config.task, semantic)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the configured model in `workdir`; returns the last test metrics."""
  steps.check_config(config)
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  prepare_data(config)
  train_split = pipeline.Split(config, "train")
  test_split = pipeline.Split(config, "test")
  # Fails early, with the override to use, when the batch does not divide.
  pipeline.per_device_batch(config.batch_size, jax.process_count(), jax.local_device_count())
  pipeline.per_device_batch(config.eval.batch_size, jax.process_count(),
                            jax.local_device_count())

  steps_per_epoch = train_split.steps_per_epoch(config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  mesh = steps.make_mesh()
  model = steps.make_model(config, axis_name=steps.AXIS)
  tx = steps.make_optimizer(config, total_steps)
  state = steps.init_state(config, model, tx, steps.input_shape(config))
  manager = checkpoints.make_manager(workdir, config)
  if manager.latest_step() is not None:
    state = checkpoints.restore(manager, state, mesh)
    logging.info("Resumed from the checkpoint of step %d in %s", int(state.step), workdir)
  else:
    state = steps.replicate(state, mesh)
  train_step = steps.make_train_step(config, model, tx, mesh)
  eval_step = steps.make_eval_step(config, model, mesh)
  predict = steps.make_predict_fn(steps.make_model(config))

  writer = logs.MetricWriter(workdir, enabled=is_chief)
  step = int(state.step)
  throughput = logs.Throughput(config.batch_size, total_steps, step)
  logging.info("Training %s for %d steps (%d epochs of %d) on %d devices, global batch %d",
               config.name, total_steps, config.num_epochs, steps_per_epoch,
               jax.device_count(), config.batch_size)
  test_metrics: dict[str, float] = {}
  try:
    for epoch in range(step // steps_per_epoch, config.num_epochs):
      batches = train_split.train_batches(
          epoch, skip_batches=step - epoch * steps_per_epoch,
          process_index=jax.process_index(), process_count=jax.process_count(),
          local_devices=jax.local_device_count())
      for host_batch in batches:
        state, train_metrics = train_step(state, steps.global_batch(host_batch, mesh))
        step += 1
        if step % config.log_every_steps == 0 or step == total_steps:
          train_metrics = {f"train/{k}": float(v) for k, v in train_metrics.items()}
          images_per_second, left = throughput.update(step)
          logging.info("step %d/%d  epoch %d  loss %.5f  %.1f images/s  %s left",
                       step, total_steps, epoch + 1, train_metrics["train/loss"],
                       images_per_second, logs.format_duration(left))
          writer.write(step, train_metrics | {"train/images_per_second": images_per_second})
        if step % config.checkpoint_every_steps == 0:
          checkpoints.save(manager, state)
      checkpoints.save(manager, state)
      test_metrics = evaluate_epoch(config, state, eval_step, test_split, mesh)
      logging.info("epoch %d  %s", epoch + 1,
                   "  ".join(f"{k} {v:.5f}" for k, v in test_metrics.items()))
      writer.write(step, test_metrics | {"epoch": epoch + 1})
      os.makedirs(os.path.join(workdir, "previews"), exist_ok=True)
      write_preview(config, os.path.join(workdir, "previews", f"epoch_{epoch + 1:03d}.png"),
                    state, predict, test_split, mesh)
  except KeyboardInterrupt:
    logging.warning("Interrupted: saving step %d before exiting", step)
    checkpoints.save(manager, state, force=True)
    raise
  finally:
    manager.wait_until_finished()
    writer.close()
  if not test_metrics:  # resumed a finished run: report its figures again
    test_metrics = evaluate_epoch(config, state, eval_step, test_split, mesh)
  return test_metrics
