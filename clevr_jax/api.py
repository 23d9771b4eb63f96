"""The Python API: segment any model's feature maps, score any label maps.

    from clevr_jax import segment, score, segmenters
    labels = segment(features, image=images)     # [B, H, W] int32, K predicted
    print(score(labels, true_masks))             # {'poster_miou': ..., 'fg_ari': ...}

`segment` runs the protocol's own device programs (`segmenters.DevicePrograms`:
the transform, K-Means and post-processing of `--mode=evaluate`), with the
segmenters of `clevr_jax.defaults` (or of a config you pass); `score` counts
contingency tables on the device and scores them with the protocol's
`metrics.score_tables`; `Accumulator` averages over many batches as the
protocol does (a mean over the images where a metric is defined).

No TensorFlow here: this module imports JAX, NumPy and the package's
segmentation and metrics only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clevr_jax import defaults
from clevr_jax import metrics
from clevr_jax import sharding
from clevr_jax.segmentation import kmeans
from clevr_jax.segmentation import segmenters as segmenters_lib
from clevr_jax.segmentation import spec

Segmenter = segmenters_lib.Segmenter
ArrayLike = np.ndarray | jax.Array
METRICS = metrics.INSTANCE_METRICS + ("k_error",)


def _config(config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  return defaults.base_config() if config is None else config


def segmenters(config: ml_collections.ConfigDict | None = None) -> dict[str, Segmenter]:
  """The segmenter registry: every segmenter `config.eval.segmenters` defines
  (default: the package's defaults), by name, each a frozen `Segmenter`
  (`segmenter_fields()` documents the fields)."""
  ev = _config(config).eval
  return {name: segmenters_lib.from_config(name, entry) for name, entry in ev.segmenters.items()}


def segmenter_fields() -> dict[str, tuple[Any, str]]:
  """Each field of a `Segmenter`: (its default, its documentation), by name."""
  docs = spec.field_docs()
  return {f.name: (f.default, docs[f.name]) for f in dataclasses.fields(Segmenter)
          if f.name != "name"}


def _batched(x: ArrayLike, ndim: int, what: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == ndim - 1:
    x = x[None]
  if x.ndim != ndim:
    raise ValueError(f"{what}: shape {list(x.shape)}; expected {ndim - 1} or {ndim} "
                     "dimensions (one image, or a batch)")
  return x


def _with_k(segmenter: Segmenter, k: int | ArrayLike | None, batch: int
            ) -> tuple[Segmenter, np.ndarray]:
  """(the segmenter to run, K per image as the protocol's `num_masks`)."""
  if k is None:
    if segmenter.k == "oracle":
      raise ValueError(f"segmenter {segmenter.name!r} takes K (k='oracle'): pass k=K (an int, "
                       "or one per image), or choose one that predicts K, e.g. "
                       "'split_merge_predict_k'")
    return segmenter, np.zeros(batch, np.int32)
  ks = np.broadcast_to(np.asarray(k, np.int32), (batch,)).copy()
  if ks.min() < 1:
    raise ValueError(f"k={k}: the number of regions is at least 1")
  if segmenter.predicts_k:  # K is predicted: k sets the clusters it merges from (K0)
    if ks.min() != ks.max():
      raise ValueError(f"segmenter {segmenter.name!r} predicts K: k is its K-Means clusters "
                       "(K0), one number for the batch")
    return dataclasses.replace(segmenter, num_clusters=int(ks[0])), ks
  # K given per image: the protocol's oracle path, with these K.
  return dataclasses.replace(segmenter, k="oracle", num_clusters=0,
                             fixed_k=max(segmenter.fixed_k, int(ks.max()))), ks


def segment(features: ArrayLike, image: ArrayLike | None = None,
            segmenter: str | Segmenter = "split_merge_predict_k",
            k: int | ArrayLike | None = None, *, is_pixels: bool = False, seed: int = 0,
            config: ml_collections.ConfigDict | None = None) -> np.ndarray:
  """Segments a batch of feature maps as the protocol segments a tap.

  Args:
    features: [B, h, w, c] (or one [h, w, c]) per-pixel features, NumPy or JAX,
      any float dtype; clustered at their own resolution.
    image: [B, H, W, 3] the images in [0, 1] (H, W multiples of h, w): needed
      by segmenters that read the image (the hybrid); when given, the labels are
      upsampled to its size.
    segmenter: a name from `segmenters()`, or a `Segmenter`.
    k: the number of regions per image (an int, or [B]) for segmenters that
      take K ('oracle' or 'fixed'); for one that predicts K, its K-Means
      clusters (K0). None: the segmenter's own (an 'oracle' one needs k).
    is_pixels: the features are the image itself: the segmenter's pixel
      transforms apply (e.g. Lab), not its tap transforms.
    seed: K-Means' seed; image b's key is folded from (seed, b), as the
      protocol folds it from the image's index.
    config: where the segmenters, K-Means settings and region slots come from
      (default: `clevr_jax.defaults.base_config()`).

  Returns:
    int32 [B, H, W] labels (at the image's size when `image` is given, else at
    the features'); 0..n-1 per image, n at most the segmenter's `k_max`.
  """
  config = _config(config)
  x = _batched(features, 4, "features")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"features: {x.dtype}; features are floats (x.astype(np.float32))")
  if not np.isfinite(x).all():
    raise ValueError("features: NaN or inf; replace them (e.g. np.nan_to_num)")
  batch, h, w, _ = x.shape
  pixels = None if image is None else _batched(image, 4, "image").astype(np.float32)
  if pixels is not None and (len(pixels) != batch or pixels.shape[1] % h or pixels.shape[2] % w):
    raise ValueError(f"image {list(pixels.shape)} and features {list(x.shape)}: one image per "
                     "feature map, its height and width multiples of the features'")
  if isinstance(segmenter, str):
    registry = segmenters(config)
    if segmenter not in registry:
      raise ValueError(f"segmenter={segmenter!r}: choose one of {sorted(registry)}")
    segmenter = registry[segmenter]
  segmenter, num_masks = _with_k(segmenter, k, batch)
  if segmenter.uses_pixels and pixels is None:
    raise ValueError(f"segmenter {segmenter.name!r} reads the image too: pass image=")
  height, width = (pixels.shape[1:3] if pixels is not None else (h, w))
  mesh = sharding.make_mesh()
  pad = -batch % jax.device_count()
  padded = lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a
  put = lambda a: jax.device_put(padded(a), sharding.batch_sharding(mesh))
  with config.unlocked():
    run_config = config.copy_and_resolve_references()
    run_config.data.image_height, run_config.data.image_width = int(height), int(width)
  programs = segmenters_lib.DevicePrograms(run_config, mesh, segmenter.k_max)
  ks = put(num_masks)
  tap = "pixels" if is_pixels else "features"
  target, threshold = segmenters_lib.merge_rule(
      segmenter, segmenters_lib.target_k(segmenter, ks), tap, segmenter.k_max)
  keys = kmeans.image_keys(seed, put(np.arange(batch, dtype=np.int32)))
  _, labels, counts = programs(
      segmenter, put(x), segmenters_lib.cluster_k(segmenter, ks), target, threshold, keys,
      put(np.zeros((batch, height, width), np.int32)),
      put(pixels) if segmenter.uses_pixels else None, is_pixels=is_pixels)
  segmenters_lib.check_region_counts(np.asarray(counts)[:batch], config.eval.max_regions,
                                     f"segmenter {segmenter.name!r}")
  return np.asarray(labels)[:batch].astype(np.int32)


def _truth_slots(true_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """True label maps renumbered 0..n-1 per image, 0 (the background) kept at 0:
  (maps, n per image)."""
  out = np.zeros(true_masks.shape, np.int32)
  counts = np.zeros(len(true_masks), np.int32)
  for b, image in enumerate(true_masks):
    values = np.union1d(image, [0])
    out[b] = np.searchsorted(values, image)
    counts[b] = len(values)
  return out, counts


def score_batch(labels: ArrayLike, true_masks: ArrayLike) -> dict[str, np.ndarray]:
  """Per-image scores of predicted label maps against true masks.

  Args:
    labels: int [B, h, w] (or one [h, w]) predicted regions, any label values
      >= 0; resized to the truth's size by nearest neighbour.
    true_masks: int [B, H, W] true instance labels, 0 the background.

  Returns:
    {metric: float64 [B]} for `METRICS` (NaN where a metric is undefined, e.g.
    the foreground scores of an image without objects).
  """
  truth = _batched(true_masks, 3, "true_masks")
  pred = _batched(labels, 3, "labels")
  for name, x in (("labels", pred), ("true_masks", truth)):
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
      raise ValueError(f"{name}: {x.dtype}; label maps are integers (x.astype(np.int32))")
    if x.size and x.min() < 0:
      raise ValueError(f"{name}: negative labels; labels are 0 or more")
  if len(pred) != len(truth):
    raise ValueError(f"labels and true_masks: {len(pred)} and {len(truth)} images")
  pred = metrics.resize_nearest(pred, *truth.shape[1:])
  truth, num_true = _truth_slots(truth)
  pred, num_pred = _truth_slots(pred)
  tables = np.asarray(metrics.contingency(jnp.asarray(truth), jnp.asarray(pred),
                                          int(num_true.max()), int(num_pred.max())))
  scores = metrics.score_tables(tables, num_true)._asdict()
  present = (tables.sum(axis=2) > 0).sum(axis=1)
  scores["k_error"] = metrics.k_error(tables, present, np.ones(len(tables), bool)).k_error
  return {m: np.asarray(scores[m], np.float64) for m in METRICS}


class Accumulator:
  """Dataset means over many batches, as the protocol averages: per metric, the
  mean over the images where it is defined.

      acc = Accumulator()
      for labels, truth in batches:
        acc.add(labels, truth)
      acc.result()  # {'poster_miou': ..., ...}
  """

  def __init__(self) -> None:
    self._mean = metrics.MeanAccumulator()
    self.num_images = 0

  def add(self, labels: ArrayLike, true_masks: ArrayLike) -> dict[str, np.ndarray]:
    """Scores one batch, adds it, and returns its per-image scores."""
    scores = score_batch(labels, true_masks)
    per_image = dict(scores)
    valid = np.ones(len(next(iter(scores.values()))), bool)
    self._mean.add(_Scores(per_image, valid))
    self.num_images += len(valid)
    return scores

  def result(self) -> dict[str, float]:
    """{metric: mean} over the images added so far."""
    return self._mean.result()


class _Scores:
  """What `metrics.MeanAccumulator.add` reads: `_asdict()` and `valid`."""

  def __init__(self, scores: Mapping[str, np.ndarray], valid: np.ndarray) -> None:
    self._scores, self.valid = dict(scores), valid

  def _asdict(self) -> dict[str, np.ndarray]:
    return self._scores | {"valid": self.valid}


def score(labels: ArrayLike | Sequence[ArrayLike], true_masks: ArrayLike | Sequence[ArrayLike]
          ) -> dict[str, float]:
  """The field's metrics of predicted label maps against true masks, averaged
  over the images as the protocol averages (see `score_batch` for the inputs;
  `Accumulator` for many batches): poster_miou, clevrtex_miou,
  clevrtex_miou_fg, mbo, mbo_fg, ari, fg_ari and k_error (|predicted -
  true| number of masks, background included)."""
  accumulator = Accumulator()
  accumulator.add(labels, true_masks)
  return accumulator.result()
