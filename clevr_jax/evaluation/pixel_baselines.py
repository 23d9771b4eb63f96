"""Baselines: raw pixels through every configured segmenter, and random masks."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from clevr_jax import logs
from clevr_jax import metrics
from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.evaluation import protocol
from clevr_jax.evaluation import results as results_lib
from clevr_jax.segmentation import segmenters as segmenters_lib

RANDOM_K = ("oracle", "fixed")


def random_masks(config: ml_collections.ConfigDict, split: Any, mesh: jax.sharding.Mesh,
                 fixed_k: int) -> dict[str, dict[str, float]]:
  """I.i.d. uniform labels over K per pixel (the oracle K, or `fixed_k`): the
  floor any method must beat."""
  accumulators = {k: metrics.MeanAccumulator() for k in RANDOM_K}
  rng = np.random.default_rng(config.eval.baselines_seed)
  slots = max(schema.MAX_SLOTS, fixed_k)
  progress = logs.Progress("random masks", protocol.num_images(config, split),
                               config.eval.progress_every_s)
  for batch in protocol.host_batches(config, split, mesh):
    truth = sharding.to_host(batch["instance_labels"])
    num_masks, valid = sharding.to_host(batch["num_masks"]), sharding.to_host(batch["valid"])
    for k in RANDOM_K:
      ks = num_masks if k == "oracle" else np.full_like(num_masks, fixed_k)
      labels = (rng.random(truth.shape) * np.maximum(ks, 1)[:, None, None]).astype(np.int32)
      tables = metrics.contingency_host(truth, labels, schema.MAX_SLOTS, slots)
      accumulators[k].add(metrics.score_tables(tables, num_masks, valid))
    progress.update(int(valid.sum()))
  return {k: accumulators[k].result() for k in RANDOM_K}


def _fixed_k(segmenters: list[segmenters_lib.Segmenter]) -> int:
  """The K of the random 'fixed' row: the first segmenter's with k='fixed' (the
  row it is the floor of), else the schema's default."""
  return next((s.fixed_k for s in segmenters if s.k == "fixed"),
              segmenters_lib.Segmenter().fixed_k)


def baselines(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Raw pixels through every segmenter, and random masks; writes baselines.{json,md}."""
  from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  split = pipeline.Split(config, "test")
  segmenters = segmenters_lib.configured(config)
  table, _ = protocol.score_features(
      config, mesh, lambda batch: {"pixels": batch["image"]}, ("pixels",), split, segmenters,
      what="baselines")
  results = {"name": "baselines", "config": config.to_dict(),
             "num_images": protocol.num_images(config, split),
             "segmenters": table,
             "segmenter_specs": {s.name: results_lib.spec_dict(s) for s in segmenters},
             "random_masks": random_masks(config, split, mesh, _fixed_k(segmenters))}
  if jax.process_index() == 0:
    results_lib.write_results(workdir, results, stem="baselines")
  return results
