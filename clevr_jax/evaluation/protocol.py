"""The sharded scoring protocol: every (segmenter, tap) over the test split.

Per batch, each device takes its own images through the features (a network's
taps, or the pixels) and the whole segmenter (`segmenters.DevicePrograms`:
transform, K-Means, post-processing and the contingency tables against the
truth, which the pipeline put on the devices once). Only the tables (images x
11 x slots counts) and each image's region count reach the host; processes
exchange tables only. Scores (Hungarian matching) follow from the tables on
every host alike. Figures are taken after the loop from the first batch's
label maps, which stayed on the devices.

Padding examples are scored as invalid and each image's K-Means key is folded
from its index, so the figures equal a single device's however many devices
or processes share the work.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from clevr_jax import logs
from clevr_jax import metrics
from clevr_jax import sharding
from clevr_jax.segmentation import kmeans
from clevr_jax.segmentation import segmenters as segmenters_lib
from clevr_jax.training import batch as batch_lib

FeaturesFn = Callable[[dict[str, jax.Array]], dict[str, jax.Array]]


def host_batches(config: ml_collections.ConfigDict, split: Any, mesh: jax.sharding.Mesh
                 ) -> Iterable[dict[str, jax.Array]]:
  """Global device batches over the test split: each host's rows go to its devices
  once, and the derived fields (labels, K, validity) are made there."""
  derive = batch_lib.make_derive(config)
  for host_batch in split.eval_batches(
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_examples=config.eval.max_images, fields=batch_lib.fields(config, "evaluate")):
    yield derive(sharding.to_global(host_batch, mesh))


def num_images(config: ml_collections.ConfigDict, split: Any) -> int:
  return min(split.num_examples, config.eval.max_images or split.num_examples)


def num_pred_slots(segmenters: Sequence[segmenters_lib.Segmenter]) -> int:
  return max(s.k_max for s in segmenters)


class Runner:
  """Runs configured segmenters on feature maps of global batches; returns tables."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               segmenters: Sequence[segmenters_lib.Segmenter], slots: int = 0) -> None:
    """`slots`: the most labels an image may end with (0: the segmenters' K-Means
    bound, `num_pred_slots`)."""
    self.config, self.mesh = config, mesh
    self.segmenters = list(segmenters)
    self.slots = slots or num_pred_slots(self.segmenters)
    self.programs = segmenters_lib.DevicePrograms(config, mesh, self.slots)

  def dispatch(self, segmenter: segmenters_lib.Segmenter, tap: str, features: jax.Array,
               batch: dict[str, jax.Array], keys: jax.Array) -> tuple[jax.Array, ...]:
    """Starts the device programs (compiling them on first use): (tables, labels,
    region counts) as device arrays."""
    num_masks = batch["num_masks"]
    target, threshold = segmenters_lib.merge_rule(
        segmenter, segmenters_lib.target_k(segmenter, num_masks), tap, self.slots)
    return self.programs(segmenter, features, segmenters_lib.cluster_k(segmenter, num_masks),
                         target, threshold, keys, batch["instance_labels"],
                         batch["image"] if segmenter.uses_pixels else None,
                         is_pixels=tap in segmenters_lib.PIXEL_TAPS)

  def collect(self, segmenter: segmenters_lib.Segmenter, tap: str,
              out: tuple[jax.Array, ...], valid: np.ndarray) -> np.ndarray:
    """The global contingency tables [B, T, P] on the host (and a warning for
    images with more regions than eval.max_regions)."""
    tables, _, counts = out
    tables, counts = sharding.to_host(tables), sharding.to_host(counts)
    segmenters_lib.check_region_counts(counts[valid], self.config.eval.max_regions,
                                       f"tap {tap!r} (segmenter {segmenter.name!r})")
    return tables


def score_features(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   features_fn: FeaturesFn, taps: Sequence[str], split: Any,
                   segmenters: Sequence[segmenters_lib.Segmenter], *, keep_first: int = 0,
                   what: str = "evaluation"
                   ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
  """Scores every segmenter on every named feature map over the test split.

  Returns ({segmenter: {tap: {metric: mean}}}, figures), where figures holds
  the first `keep_first` images of the first batch (of process 0's share):
  image, instance_labels, num_masks, features {tap}, labels {segmenter: {tap}}
  and per-image scores {segmenter: {tap}}.
  """
  runner = Runner(config, mesh, segmenters)
  accumulators = {(s.name, t): metrics.MeanAccumulator()
                  for s in segmenters for t in taps if s.scores(t)}
  k_accumulators = {(s.name, t): metrics.MeanAccumulator()
                    for s in segmenters if s.predicts_k for t in taps if s.scores(t)}
  first: dict[str, Any] = {}
  progress = logs.Progress(what, num_images(config, split), config.eval.progress_every_s)
  jobs = [(s, t) for s in segmenters for t in taps if s.scores(t)]
  # Each batch's programs are started from a pool of threads (one per core), so
  # that they run side by side; the call that compiles a shared program runs
  # alone (`segmenters.DevicePrograms`). Host transfers stay in this thread, in
  # order (in several processes they are collectives).
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
  for batch in host_batches(config, split, mesh):
    keys = kmeans.image_keys(config.seed, batch["index"])
    num_masks, valid = sharding.to_host(batch["num_masks"]), sharding.to_host(batch["valid"])
    features = features_fn(batch)

    def dispatch(job, batch=batch, features=features, keys=keys):
      segmenter, tap = job
      return runner.dispatch(segmenter, tap, features[tap], batch, keys)

    outputs = {(s.name, t): out for (s, t), out in zip(jobs, pool.map(dispatch, jobs))}
    labels, scores = {}, {}
    for segmenter, tap in jobs:
      out = outputs[segmenter.name, tap]
      tables = runner.collect(segmenter, tap, out, valid)
      labels[segmenter.name, tap] = out[1]
      scores[segmenter.name, tap] = metrics.score_tables(tables, num_masks, valid)
      accumulators[segmenter.name, tap].add(scores[segmenter.name, tap])
      if segmenter.predicts_k:
        k_accumulators[segmenter.name, tap].add(metrics.k_error(tables, num_masks, valid))
    if keep_first and not first:
      first = {"batch": batch, "features": features, "labels": labels, "scores": scores}
    progress.update(int(valid.sum()))
  pool.shutdown()
  table: dict[str, dict[str, dict[str, float]]] = {}
  for segmenter in segmenters:
    for tap in (t for t in taps if segmenter.scores(t)):
      row = accumulators[segmenter.name, tap].result()
      if segmenter.predicts_k:
        row.update(k_accumulators[segmenter.name, tap].result())
      table.setdefault(segmenter.name, {})[tap] = row
  return table, (_figures(first, keep_first, taps) if first else {})


def _figures(first: dict[str, Any], n: int, taps: Sequence[str]) -> dict[str, Any]:
  """The first `n` images of this process's share of the first batch, to the host."""
  def rows(x):
    return sharding.local_rows(x)[:n]

  batch = first["batch"]
  figures: dict[str, Any] = {k: rows(batch[k]) for k in ("image", "instance_labels",
                                                          "num_masks")}
  figures["features"] = {t: rows(first["features"][t]) for t in taps}
  figures["labels"], figures["scores"] = {}, {}
  for (name, tap), labels in first["labels"].items():
    figures["labels"].setdefault(name, {})[tap] = rows(labels)
    figures["scores"].setdefault(name, {})[tap] = first["scores"][name, tap]
  return figures
