"""Supervised scoring: the segmentation U-Net's class maps against the truth."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from clevr_jax import logs
from clevr_jax import metrics
from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.evaluation import protocol
from clevr_jax.training import train_step


def score(config: ml_collections.ConfigDict, state: Any, model: Any, split: Any,
          mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], dict[str, Any]]:
  """(pixel accuracy, per-class IoU, the poster's class Hungarian mIoU, confusion; figures)."""
  predict = train_step.make_predict_fn(model)
  accumulator = metrics.SupervisedAccumulator(schema.NUM_SEMANTIC_CLASSES,
                                              schema.SEMANTIC_CLASSES)
  progress = logs.Progress("supervised evaluation", protocol.num_images(config, split),
                               config.eval.progress_every_s)
  first: dict[str, Any] = {}
  for batch in protocol.host_batches(config, split, mesh):
    logits, _ = predict(state, batch["image"])
    pred = sharding.to_host(jnp.argmax(logits, -1))
    semantic, valid = sharding.to_host(batch["semantic"]), sharding.to_host(batch["valid"])
    accumulator.add(metrics.score_supervised(
        semantic, pred, valid, num_classes=schema.NUM_SEMANTIC_CLASSES))
    if not first:
      n = config.eval.num_figure_images
      first = {"image": sharding.to_host(batch["image"])[:n], "semantic": semantic[:n],
               "pred": pred[:n]}
    progress.update(int(valid.sum()))
  result = accumulator.result()
  result["confusion"] = accumulator.confusion.tolist()
  return result, first
