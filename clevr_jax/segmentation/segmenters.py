"""Segmenters: features -> transform -> cluster -> post-process -> labels.

A segmenter is named in `config.eval.segmenters` (a small ConfigDict each;
`config.eval.segmenter_names` says which run, in which order). All of it runs
on the devices, each device on its own images: the transform, K-Means, the
optional post-processing (`regions.py`) and the contingency tables
(`DevicePrograms`: the K-Means program is shared by every segmenter and tap of
one feature shape).

Each segmenter is a `spec.Segmenter`: its fields, their defaults and
documentation, and its validation live there.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from clevr_jax import metrics
from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.segmentation import kmeans
from clevr_jax.segmentation import regions
from clevr_jax.segmentation import spec
from clevr_jax.segmentation import transforms

Segmenter = spec.Segmenter
PIXEL_TAPS = spec.PIXEL_TAPS
from_config = spec.from_config


def configured(config: ml_collections.ConfigDict) -> list[Segmenter]:
  """The segmenters `config.eval.segmenter_names` selects, in that order."""
  ev = config.eval
  return [from_config(n, ev.segmenters[n]) for n in ev.segmenter_names]


def target_k(segmenter: Segmenter, num_masks: jax.Array) -> jax.Array:
  """The regions wanted per image (for 'predict', the clusters merged from)."""
  if segmenter.k == "oracle":
    return num_masks
  if segmenter.k == "fixed":
    return jnp.full_like(num_masks, segmenter.fixed_k)
  return jnp.full_like(num_masks, segmenter.num_clusters)


def cluster_k(segmenter: Segmenter, num_masks: jax.Array) -> jax.Array:
  if segmenter.num_clusters > 0:
    return jnp.full_like(num_masks, segmenter.num_clusters)
  return target_k(segmenter, num_masks)


def transform(segmenter: Segmenter, features: jax.Array, *, is_pixels: bool) -> jax.Array:
  """The features [B, h, w, c] under the segmenter's transforms: [B, h, w, c']."""
  return transforms.apply(features.astype(jnp.float32), segmenter.transforms_for(
      "pixels" if is_pixels else "tap"), is_rgb=is_pixels, pca_dim=segmenter.pca_dim,
                          xy_weight=segmenter.xy_weight)


def cluster(x: jax.Array, num_clusters: jax.Array, keys: jax.Array,
            kmeans_config: ml_collections.ConfigDict, *, k_max: int,
            metric: str | jax.Array, point_weights: jax.Array | None = None) -> jax.Array:
  """K-Means labels [B, h, w] of transformed features [B, h, w, c], at the tap's own
  resolution (kmeans.py says why that equals clustering the upsampled map).
  `num_clusters` [B]: K per image (`cluster_k`); `metric` a name, or a boolean
  array (True = cosine) so that one compiled program serves every segmenter."""
  b, h, w, c = x.shape
  result = kmeans.kmeans(
      x.reshape(b, h * w, c), num_clusters, keys, k_max=k_max,
      num_restarts=kmeans_config.num_restarts, max_iter=kmeans_config.max_iter,
      tol=kmeans_config.tol, metric=metric,
      point_weights=point_weights)
  return result.labels.reshape(b, h, w)


def transform_and_cluster(segmenter: Segmenter, kmeans_config: ml_collections.ConfigDict,
                          features: jax.Array, num_clusters: jax.Array, keys: jax.Array,
                          *, is_pixels: bool, point_weights: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """(transformed features [B, h, w, c'], cluster labels [B, h, w]) of one tap.
  Jittable."""
  x = transform(segmenter, features, is_pixels=is_pixels)
  return x, cluster(x, num_clusters, keys, kmeans_config, k_max=segmenter.k_max,
                    metric=segmenter.metric, point_weights=point_weights)


def shape_split_args(segmenter: Segmenter, height: int, width: int
                     ) -> dict[str, float] | None:
  """`regions.shape_split`'s settings in pixels at this image size; None without it."""
  if not segmenter.shape_split:
    return None
  return dict(min_radius=segmenter.shape_split_min_radius * height,
              waist=segmenter.shape_split_waist,
              max_area=int(round(segmenter.shape_split_max_area * height * width)))


def _one_image_postprocess(segmenter: Segmenter, height: int, width: int, *,
                           modal_size: int, split: bool, max_regions: int, cap: int,
                           border_factor: jax.Array | None = None):
  """`regions.postprocess` of one image with the segmenter's settings at this size,
  the border factor `segmenter.border_merge_factor` unless given."""
  one_image = functools.partial(
      regions.postprocess, num_labels=segmenter.k_max, modal_size=modal_size, split=split,
      min_area=int(round(segmenter.min_area * height * width)), max_regions=max_regions,
      cap=cap, metric=segmenter.metric,
      shape_split_args=shape_split_args(segmenter, height, width),
      refine_steps=segmenter.refine_steps)
  factor = segmenter.border_merge_factor if border_factor is None else border_factor
  return lambda labels, x, target, threshold: one_image(labels, x, target, threshold,
                                                        border_factor=factor)


def postprocess(segmenter: Segmenter, labels: jax.Array, x: jax.Array, target: jax.Array,
                threshold: jax.Array, *, max_regions: int, cap: int,
                border_factor: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The segmenter's post-processing of cluster labels [B, h, w] of the features x
  [B, h, w, c]: (labels [B, h, w] in 0..cap-1, regions per image after absorbing
  specks; zeros without post-processing). `border_factor`: the merge's, as an
  input of the program (`segmenter.border_merge_factor` when None). See `segment`
  for the other arguments."""
  if not segmenter.post_processes:
    return labels, jnp.zeros(labels.shape[:1], jnp.int32)
  _, h, w = labels.shape
  one_image = _one_image_postprocess(segmenter, h, w, modal_size=segmenter.modal_size,
                                     split=segmenter.split, max_regions=max_regions, cap=cap,
                                     border_factor=border_factor)
  return jax.vmap(one_image)(labels, x, target, threshold)


def merge_rule(segmenter: Segmenter, target: jax.Array, tap: str, cap: int
               ) -> tuple[jax.Array, jax.Array]:
  """(target [B], threshold [B]) for `regions.merge`: down to `target` (K) with no
  threshold, while under the segmenter's threshold for 'predict', or without
  merging only down to `cap` (the label slots)."""
  # full_like keeps the target's sharding: these are inputs of sharded programs.
  target = jnp.asarray(target, jnp.int32)
  inf = jnp.full_like(target, jnp.inf, dtype=jnp.float32)
  if not segmenter.merge:
    return jnp.full_like(target, cap), inf
  if segmenter.predicts_k:
    return jnp.zeros_like(target), jnp.full_like(target, segmenter.threshold_for(tap),
                                                  dtype=jnp.float32)
  return jnp.maximum(target, 1), inf


def segment(segmenter: Segmenter, kmeans_config: ml_collections.ConfigDict,
            features: jax.Array, num_clusters: jax.Array, keys: jax.Array, target: jax.Array,
            threshold: jax.Array, *, is_pixels: bool, max_regions: int, cap: int,
            point_weights: jax.Array | None = None, pixels: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """The whole segmenter on a batch of one tap, jittable: (labels [B, h, w] in
  0..cap-1 at the tap's resolution, regions per image after absorbing specks).
  The labels come from K-Means, or for cluster='argmax' from each pixel's largest
  channel; then the optional post-processing.

  `num_clusters` [B]: K-Means' K (`cluster_k`); `target`, `threshold` [B]: the
  merge's stopping rule (`merge_rule`); `max_regions`: R, the region slots (an
  image with more regions than R loses its smallest: `check_region_counts`);
  `cap`: the most labels an image may end with. `pixels` [B, H, W, 3] in [0, 1]:
  the image, for segmenters that read it (`uses_pixels`; their labels are then
  at the image's resolution). `point_weights` [B, points]: each point's weight
  in K-Means, at the resolution it clusters (the tap's; the image's for one
  that reads the image).
  """
  if segmenter.uses_pixels:
    return _segment_hybrid(segmenter, kmeans_config, features, pixels, num_clusters, keys,
                           target, threshold, is_pixels=is_pixels, max_regions=max_regions,
                           cap=cap, point_weights=point_weights)
  if segmenter.cluster == "argmax":
    x, labels = features, jnp.argmax(features, axis=-1).astype(jnp.int32)
  else:
    x, labels = transform_and_cluster(segmenter, kmeans_config, features, num_clusters, keys,
                                      is_pixels=is_pixels, point_weights=point_weights)
  return postprocess(segmenter, labels, x, target, threshold, max_regions=max_regions,
                     cap=cap)


def check_channels(segmenter: Segmenter, channels: int) -> None:
  """cluster='argmax' labels each pixel by its largest channel: ValueError when
  the tap has more channels than the labels the segmenter counts (k_max)."""
  if segmenter.cluster == "argmax" and channels > segmenter.k_max:
    raise ValueError(
        f"eval.segmenters.{segmenter.name}: the tap has {channels} channels "
        f"(slots), more than the {segmenter.k_max} labels it counts: set "
        f"--config.eval.segmenters.{segmenter.name}.num_clusters={channels}")


def _segment_hybrid(segmenter: Segmenter, kmeans_config: ml_collections.ConfigDict,
                    features: jax.Array, pixels: jax.Array | None, num_clusters: jax.Array,
                    keys: jax.Array, target: jax.Array, threshold: jax.Array, *,
                    is_pixels: bool, max_regions: int, cap: int,
                    point_weights: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """`segment` for a segmenter that reads the image: regions from the pixels'
  clusters, majority-filtered, then split, absorbed and merged by the region
  means of `merge_source`, all at the image's resolution."""
  if pixels is None:
    raise ValueError(f"a segmenter that reads the image (split_source="
                     f"{segmenter.split_source!r}, merge_source={segmenter.merge_source!r}) "
                     "was given none")
  _, height, width, _ = pixels.shape
  colour, pixel_labels = transform_and_cluster(segmenter, kmeans_config, pixels,
                                               num_clusters, keys, is_pixels=True,
                                               point_weights=point_weights)
  k = segmenter.k_max
  modal = jax.vmap(functools.partial(regions.modal_filter, num_labels=k,
                                     size=segmenter.modal_size))
  labels, tap = modal(pixel_labels), colour
  if not is_pixels:
    tap = transforms.upsample_nearest(transform(segmenter, features, is_pixels=False),
                                      height, width)
  if is_pixels or segmenter.merge_source == "pixels":
    x = colour
  elif segmenter.merge_source == "tap":
    x = tap
  else:  # colour in the tap's units: under the tap's threshold iff under its own
    x = (tap, colour * segmenter.colour_scale)
  # The labels are filtered above; the regions are the clusters' components.
  one_image = _one_image_postprocess(segmenter, height, width, modal_size=0, split=True,
                                     max_regions=max_regions, cap=cap)
  return jax.vmap(one_image)(labels, x, target, threshold)


def check_region_counts(counts: np.ndarray, max_regions: int, where: str) -> None:
  """Warns, naming the field, when images had more regions than R (`regions.compact`
  then absorbed their smallest regions too, unlike the SciPy reference)."""
  over = np.asarray(counts) > max_regions
  if over.any():
    logging.warning(
        "%d image(s) of %s had more regions than eval.max_regions=%d after absorbing "
        "specks (up to %d): their smallest regions were absorbed too; raise "
        "--config.eval.max_regions to keep them", int(over.sum()), where, max_regions,
        int(np.max(counts)))


class _CompiledOnce:
  """A jitted function whose first call for each input shape, the one that
  compiles, runs alone: threads that start it at once wait for that compile
  instead of repeating it. Later calls do not wait."""

  def __init__(self, fn: Callable[..., Any]) -> None:
    self.fn, self._lock, self._ready = fn, threading.Lock(), set()

  def __call__(self, *args: Any) -> Any:
    shapes = tuple(getattr(a, "shape", None) for a in args)
    if shapes in self._ready:
      return self.fn(*args)
    with self._lock:
      out = self.fn(*args)
      self._ready.add(shapes)
    return out


class DevicePrograms:
  """The segmenters and their scoring as sharded device programs, each device on
  its own images; compiled on first use and shared by what they depend on.

  A segmenter that clusters a tap with K-Means runs as three programs whose
  arrays stay on the devices: its transform, the K-Means, and the
  post-processing with the upsampling and the contingency tables. The K-Means
  program depends only on the transformed features' shape (K, keys and the
  metric are inputs), so every such segmenter, and every tap of that shape,
  shares one compile; the post-processing program is shared by the taps of one
  shape. On a short evaluation the compiles, not the runs, are most of the
  time (docs/reports/2026-12-06-segmenters-on-devices.md). A segmenter that
  reads the image too (the hybrid) or takes each pixel's largest channel
  ('argmax') runs as one program. Each program is built from, and keyed by,
  `Segmenter.program(stage)`: what shapes it, derived from the fields' metadata.

  Only the tables and region counts need to reach the host; the labels stay on
  the devices unless figures want them.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               num_pred_slots: int) -> None:
    self.config, self.mesh, self.cap = config, mesh, num_pred_slots
    self.height, self.width = config.data.image_height, config.data.image_width
    self._fns: dict[tuple[Any, ...], Callable[..., Any]] = {}
    self._lock = threading.Lock()

  @property
  def keys(self) -> tuple[tuple[Any, ...], ...]:
    """The programs made so far (each compiled once per input shape)."""
    return tuple(self._fns)

  @staticmethod
  def staged(segmenter: Segmenter) -> bool:
    return segmenter.cluster == "kmeans" and not segmenter.uses_pixels

  def _program(self, key: tuple[Any, ...], make: Callable[[], Callable[..., Any]],
               in_specs: Any = P(sharding.AXIS)) -> Callable[..., Any]:
    with self._lock:
      if key not in self._fns:
        # No collective inside: the loops' carries would need varying-axis
        # annotations for the check, which adds nothing here.
        self._fns[key] = _CompiledOnce(jax.jit(jax.shard_map(
            make(), mesh=self.mesh, in_specs=in_specs, out_specs=P(sharding.AXIS),
            check_vma=False)))
      return self._fns[key]

  def _score(self, labels: jax.Array, true_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    labels = kmeans.upsample_labels(labels, self.height, self.width)
    return metrics.contingency(true_labels, labels, schema.MAX_SLOTS, self.cap), labels

  def __call__(self, segmenter: Segmenter, features: jax.Array, num_clusters: jax.Array,
               target: jax.Array, threshold: jax.Array, keys: jax.Array,
               true_labels: jax.Array, pixels: jax.Array | None, *, is_pixels: bool
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Starts the programs (compiling them on first use): (contingency tables
    [B, T, P], labels [B, H, W], regions per image after absorbing specks [B])."""
    ev, cap = self.config.eval, self.cap
    check_channels(segmenter, features.shape[-1])
    # Each program is built from, and keyed by, what shapes it (`Segmenter.program`).
    if not self.staged(segmenter):
      whole_spec = segmenter.program("whole")

      def whole(features, num_clusters, target, threshold, keys, true_labels, pixels):
        labels, counts = segment(whole_spec, ev.kmeans, features, num_clusters, keys, target,
                                 threshold, is_pixels=is_pixels, max_regions=ev.max_regions,
                                 cap=cap, pixels=pixels)
        return (*self._score(labels, true_labels), counts)
      fn = self._program(("whole", whole_spec, is_pixels), lambda: whole)
      return fn(features, num_clusters, target, threshold, keys, true_labels, pixels)

    x = features
    if segmenter.transforms_for("pixels" if is_pixels else "tap") or features.dtype != jnp.float32:
      transform_spec = segmenter.program("transform")
      x = self._program(
          ("transform", transform_spec, is_pixels),
          lambda: functools.partial(transform, transform_spec, is_pixels=is_pixels))(features)
    kmeans_spec = segmenter.program("kmeans")
    cluster_fn = self._program(
        ("kmeans", kmeans_spec),
        lambda: lambda x, k, keys, cosine: cluster(x, k, keys, ev.kmeans,
                                                   k_max=kmeans_spec.k_max, metric=cosine),
        in_specs=(P(sharding.AXIS),) * 3 + (P(),))
    labels = cluster_fn(x, num_clusters, keys, np.bool_(segmenter.metric == "cosine"))
    if not segmenter.post_processes:
      def score(labels, true_labels):
        tables, labels = self._score(labels, true_labels)
        return tables, labels, jnp.zeros(labels.shape[:1], jnp.int32)
      return self._program(("score",), lambda: score)(labels, true_labels)

    postprocess_spec = segmenter.program("postprocess")

    def finish(labels, x, target, threshold, true_labels, border_factor):
      labels, counts = postprocess(postprocess_spec, labels, x, target, threshold,
                                   max_regions=ev.max_regions, cap=cap,
                                   border_factor=border_factor)
      return (*self._score(labels, true_labels), counts)
    return self._program(("postprocess", postprocess_spec), lambda: finish,
                         in_specs=(P(sharding.AXIS),) * 5 + (P(),))(
        labels, x, target, threshold, true_labels, np.float32(segmenter.border_merge_factor))
