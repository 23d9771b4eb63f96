"""The sharded scoring protocol: every (segmenter, tap) over the test split.

Per batch, each device takes its own images through the features (a network's
taps, or the pixels), the segmenter's transform and K-Means, and, for
segmenters without post-processing, the contingency tables against the truth.
Only the tables (images x 11 x k_max counts) reach the host. A post-processing
segmenter sends its cluster labels and transformed features to the host of
the process that owns the images; that host finishes them (SciPy), counts the
tables, and the processes exchange tables only. Scores (Hungarian matching)
follow from the tables on every host alike.

Padding examples are scored as invalid and each image's K-Means key is folded
from its index, so the figures equal a single device's however many devices
or processes share the work.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clevr_jax import metrics
from clevr_jax import schema
from clevr_jax import batch as batch_lib
from clevr_jax import sharding
from clevr_jax.evaluation import segmenters as segmenters_lib

FeaturesFn = Callable[[dict[str, jax.Array]], dict[str, jax.Array]]
# What the host keeps of a batch (see `device_batch`); images come back only for figures.
_LOCAL = ("instance_labels", "num_masks", "valid")


class Progress:
  """Logs images done, images/s and the time left, at most every `every_s` seconds."""

  def __init__(self, what: str, total: int, every_s: float = 10.0) -> None:
    self.what, self.total, self.every_s = what, total, every_s
    self.done = 0
    self.start = self.last = time.perf_counter()

  def update(self, images: int) -> None:
    self.done += images
    now = time.perf_counter()
    if now - self.last < self.every_s and self.done < self.total:
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    left = (self.total - self.done) / rate if rate > 0 else float("nan")
    logging.info("%s: %d/%d images, %.1f images/s, %.0f s left", self.what,
                 min(self.done, self.total), self.total, rate, max(left, 0.0))


def device_batch(host_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                 derive: Callable[[dict[str, jax.Array]], dict[str, jax.Array]]
                 ) -> tuple[dict[str, jax.Array], dict[str, np.ndarray]]:
  """A pipeline host batch (stored uint8 fields) -> (derived global device arrays,
  this process's truth on the host for post-processing and figures).

  The one place that knows the pipeline's batch layout. The host keeps its own
  rows of what host post-processing and the scores need (labels, K, validity),
  derived once on the devices by the same function as the steps use.
  """
  batch = derive(sharding.to_global(host_batch, mesh))
  local = {k: sharding.local_rows(batch[k]) for k in _LOCAL}
  return batch, local


def host_batches(config: ml_collections.ConfigDict, split: Any, mesh: jax.sharding.Mesh
                 ) -> Iterable[tuple[dict[str, jax.Array], dict[str, np.ndarray]]]:
  """(global device batch, this process's truth on the host) over the test split."""
  derive = batch_lib.make_derive(config)
  for host_batch in split.eval_batches(
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_examples=config.eval.max_images, fields=batch_lib.fields(config, "evaluate")):
    yield device_batch(host_batch, mesh, derive)


def num_images(config: ml_collections.ConfigDict, split: Any) -> int:
  return min(split.num_examples, config.eval.max_images or split.num_examples)


def image_keys(seed: int, index: jax.Array) -> jax.Array:
  """One K-Means key per image, folded from its index in the split."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(index.astype(jnp.uint32))


def num_pred_slots(segmenters: Sequence[segmenters_lib.Segmenter]) -> int:
  return max(s.k_max for s in segmenters)


class Runner:
  """Runs configured segmenters on feature maps of global batches; returns tables."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               segmenters: Sequence[segmenters_lib.Segmenter]) -> None:
    self.config, self.mesh = config, mesh
    self.segmenters = list(segmenters)
    self.slots = num_pred_slots(self.segmenters)
    self._fns: dict[tuple[Any, ...], Callable[..., Any]] = {}

  def _fn(self, segmenter, is_pixels):
    key = (segmenter.device_key, is_pixels)
    if key not in self._fns:
      self._fns[key] = segmenters_lib.make_device_fn(
          segmenter, self.config, self.mesh, is_pixels=is_pixels, num_pred_slots=self.slots)
    return self._fns[key]

  def run(self, segmenter: segmenters_lib.Segmenter, tap: str, features: jax.Array,
          batch: dict[str, jax.Array], local: dict[str, np.ndarray], keys: jax.Array,
          want_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(global contingency tables [B, T, P] on the host, this process's labels or None)."""
    fn = self._fn(segmenter, tap in segmenters_lib.PIXEL_TAPS)
    out = fn(features, segmenters_lib.cluster_k(segmenter, batch["num_masks"]), keys,
             batch["instance_labels"])
    if not segmenter.post_processes:
      tables, labels = out
      return sharding.to_host(tables), (sharding.local_rows(labels) if want_labels else None)
    cluster_labels, transformed = (sharding.local_rows(o) for o in out)
    targets = np.asarray(segmenters_lib.target_k(segmenter, jnp.asarray(local["num_masks"])))
    height, width = local["instance_labels"].shape[1:]
    regions = segmenters_lib.postprocess_batch(
        segmenter, cluster_labels, transformed, targets, self.slots, local["valid"], tap)
    labels = segmenters_lib.upsample(regions, height, width)
    tables = metrics.contingency_host(local["instance_labels"], labels, schema.MAX_SLOTS,
                                      self.slots)
    return sharding.gather_rows(tables), (labels if want_labels else None)


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
  progress = Progress(what, num_images(config, split), config.eval.progress_every_s)
  for batch, local in host_batches(config, split, mesh):
    keys = image_keys(config.seed, batch["index"])
    num_masks, valid = sharding.to_host(batch["num_masks"]), sharding.to_host(batch["valid"])
    features = features_fn(batch)
    want = bool(keep_first) and not first
    labels_kept: dict[str, dict[str, np.ndarray]] = {}
    scores_kept: dict[str, dict[str, metrics.InstanceScores]] = {}
    for segmenter in segmenters:
      for tap in (t for t in taps if segmenter.scores(t)):
        tables, labels = runner.run(segmenter, tap, features[tap], batch, local, keys, want)
        scores = metrics.score_tables(tables, num_masks, valid)
        accumulators[segmenter.name, tap].add(scores)
        if segmenter.predicts_k:
          k_accumulators[segmenter.name, tap].add(metrics.k_error(tables, num_masks, valid))
        if want:
          labels_kept.setdefault(segmenter.name, {})[tap] = labels[:keep_first]
          scores_kept.setdefault(segmenter.name, {})[tap] = scores
    if want:
      first = {k: local[k][:keep_first] for k in ("instance_labels", "num_masks")}
      first["image"] = sharding.local_rows(batch["image"])[:keep_first]
      first["features"] = {t: sharding.local_rows(features[t])[:keep_first] for t in taps}
      first["labels"], first["scores"] = labels_kept, scores_kept
    progress.update(int(valid.sum()))
  table: dict[str, dict[str, dict[str, float]]] = {}
  for segmenter in segmenters:
    for tap in (t for t in taps if segmenter.scores(t)):
      row = accumulators[segmenter.name, tap].result()
      if segmenter.predicts_k:
        row.update(k_accumulators[segmenter.name, tap].result())
      table.setdefault(segmenter.name, {})[tap] = row
  return table, first
