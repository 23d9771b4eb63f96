"""Segmenters: features -> transform -> cluster -> post-process -> labels.

A segmenter is named in `config.eval.segmenters` (a small ConfigDict each;
`config.eval.segmenter_names` says which run, in which order). All of it runs
on the devices, each device on its own images: the transform, K-Means, the
optional post-processing (`regions.py`) and the contingency tables
(`DevicePrograms`: the K-Means program is shared by every segmenter and tap of
one feature shape).

Fields of a segmenter (see `clevr_jax.defaults.segmenter` for the defaults):
  cluster           'kmeans', or 'argmax': each pixel's largest channel is its
                    label (a tap of per-slot masks: Slot Attention's
                    'slot_masks'), no transform, no K; labels >= k_max count as none
  taps              the taps it scores (() = every tap and the raw pixels)
  pixel_transforms  transforms of raw pixels (the 'input' tap and baselines),
                    comma-separated names from `transforms.TRANSFORMS`
  tap_transforms    transforms of learned taps (and hypercolumns)
  pca_dim, xy_weight  parameters of the 'pca' and 'xy' transforms
  metric            K-Means metric: 'cosine' (the poster) or 'euclidean'
  k                 the regions wanted: 'oracle' (the image's number of true
                    masks, background included), 'fixed' (eval.kmeans.fixed_k)
                    or 'predict' (no K given: merging under a threshold decides)
  num_clusters      K-Means clusters; 0 = the K above. More than K over-clusters
                    (K0), and post-processing merges back.
  modal_size        majority filter window (0/1: none), before splitting
  split             split every cluster into its 4-connected components
  min_area          regions under this fraction of the image's area (e.g. 5e-4:
                    38 pixels at 240x320) are absorbed into the nearest kept region
  merge             merge adjacent regions by mean-feature distance: down to K
                    ('oracle'/'fixed'), or while closer than merge_threshold
                    ('predict')
  merge_threshold   the distance under which 'predict' merges (raw pixels and
                    any tap, unless tap_merge_threshold is set)
  tap_merge_threshold  the same for learned taps (> 0): distances in a learned
                    space have their own scale (e.g. the margins of the loss
                    that shaped it), so a threshold tuned on colour need not
                    carry over
  split_source      what draws the regions: 'tap' (the scored features' own
                    clusters), 'pixels' (clusters of the image under
                    pixel_transforms: sharp boundaries, one region per colour
                    blob) or 'pixels_and_tap' (the pixels' clusters intersected
                    with the tap's, so that two touching objects of one colour
                    with different learned codes come apart)
  tap_cut_min_width for 'pixels_and_tap': a piece the tap cuts off a pixel region
                    that holds no window this wide (in image pixels) rejoins its
                    pixel region (`regions.tap_cuts`): the learned tap's halo
                    past an object's colour edge is not a boundary
  merge_source      whose region means the merge compares: 'tap' or 'pixels'.
                    With split_source='pixels*' and merge_source='tap' this is
                    the hybrid: pixels draw the boundaries, the learned tap
                    (upsampled nearest to the pixel grid) decides what belongs
                    together; it runs at the image's resolution.
                    'tap_or_pixels': two regions merge when either says they
                    belong together, the tap under tap_merge_threshold or their
                    colours under colour_merge_threshold (with a K, the nearer
                    of the two, each over its threshold, orders the merges): a
                    shadow whose learned code lies between the object's and
                    the floor's still joins the floor it is the colour of
  colour_merge_threshold  for 'tap_or_pixels' on a learned tap: the Lab distance
                    under which colour alone merges (0: merge_threshold). It can
                    be stricter than the pixels' own merge, which must also join
                    an object's shading that the tap joins here
"""

from __future__ import annotations

import dataclasses
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
from clevr_jax.segmentation import transforms

K_SOURCES = ("oracle", "fixed", "predict")
CLUSTERS = ("kmeans", "argmax")
SPLIT_SOURCES = ("tap", "pixels", "pixels_and_tap")
MERGE_SOURCES = ("tap", "pixels", "tap_or_pixels")
METRICS = ("cosine", "euclidean")
# Tap names whose features are the image itself.
PIXEL_TAPS = ("input", "pixels")


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """One configured segmenter (see the module docstring for the fields)."""
  name: str
  cluster: str = "kmeans"
  taps: tuple[str, ...] = ()
  pixel_transforms: tuple[str, ...] = ()
  tap_transforms: tuple[str, ...] = ()
  pca_dim: int = 8
  xy_weight: float = 0.0
  metric: str = "cosine"
  k: str = "oracle"
  num_clusters: int = 0
  fixed_k: int = 11
  modal_size: int = 0
  split: bool = False
  min_area: float = 0.0
  merge: bool = False
  merge_threshold: float = 0.0
  tap_merge_threshold: float = 0.0
  colour_merge_threshold: float = 0.0
  split_source: str = "tap"
  merge_source: str = "tap"
  tap_cut_min_width: int = 0

  def scores(self, tap: str) -> bool:
    """Whether it scores `tap` (its `taps`, or every tap)."""
    return not self.taps or tap in self.taps

  @property
  def post_processes(self) -> bool:
    return self.split or self.merge or self.min_area > 0 or self.modal_size > 1

  @property
  def predicts_k(self) -> bool:
    return self.k == "predict"

  @property
  def device_key(self) -> tuple[Any, ...]:
    """What the device program depends on (K, the merge target and threshold are
    inputs): segmenters that agree on it share one compiled program."""
    return (self.cluster, self.pixel_transforms, self.tap_transforms, self.pca_dim,
            self.xy_weight, self.metric, self.k_max, self.post_processes, self.modal_size,
            self.split, self.min_area, self.split_source, self.merge_source,
            self.tap_cut_min_width, self.colour_scale)

  @property
  def uses_pixels(self) -> bool:
    """Whether it reads the image besides the tap (the hybrid's pixel split or merge)."""
    return self.split_source != "tap" or self.merge_source != "tap"

  def transforms_for(self, tap: str) -> tuple[str, ...]:
    return self.pixel_transforms if tap in PIXEL_TAPS else self.tap_transforms

  def threshold_for(self, tap: str) -> float:
    """The 'predict' threshold: it belongs to the space the merge compares in."""
    if (tap in PIXEL_TAPS or self.merge_source == "pixels"
        or self.tap_merge_threshold <= 0):
      return self.merge_threshold
    return self.tap_merge_threshold

  @property
  def colour_threshold(self) -> float:
    """The colour distance under which 'tap_or_pixels' merges on a learned tap."""
    return self.colour_merge_threshold or self.merge_threshold

  @property
  def colour_scale(self) -> float:
    """'tap_or_pixels': the factor that puts Lab distances in the tap's units, where
    a colour distance under its threshold is one under the tap's; else 0."""
    if self.merge_source != "tap_or_pixels":
      return 0.0
    return self.tap_merge_threshold / self.colour_threshold

  @property
  def k_max(self) -> int:
    """K-Means' static cluster bound; with the poster's settings, its old value."""
    return max(schema.MAX_SLOTS, self.fixed_k, self.num_clusters)


def from_config(name: str, spec: ml_collections.ConfigDict, fixed_k: int) -> Segmenter:
  """A Segmenter from its ConfigDict; ValueError names a bad field."""
  fields = {f.name for f in dataclasses.fields(Segmenter)} - {"name", "fixed_k"}
  values = dict(spec)
  unknown = set(values) - fields
  if unknown:
    raise ValueError(f"eval.segmenters.{name}: unknown field(s) {sorted(unknown)}; "
                     f"the fields are {sorted(fields)}")
  for key in ("pixel_transforms", "tap_transforms"):
    if key in values:
      values[key] = transforms.parse(values[key])
  if "taps" in values:
    values["taps"] = tuple(values["taps"])
  segmenter = Segmenter(name=name, fixed_k=fixed_k, **values)
  if segmenter.cluster not in CLUSTERS:
    raise ValueError(f"eval.segmenters.{name}.cluster={segmenter.cluster!r}: "
                     f"choose one of {list(CLUSTERS)}")
  if segmenter.metric not in METRICS:
    raise ValueError(f"eval.segmenters.{name}.metric={segmenter.metric!r}: "
                     f"choose one of {list(METRICS)}")
  if segmenter.k not in K_SOURCES:
    raise ValueError(f"eval.segmenters.{name}.k={segmenter.k!r}: choose one of {list(K_SOURCES)}")
  for field, value, allowed in (("split_source", segmenter.split_source, SPLIT_SOURCES),
                                ("merge_source", segmenter.merge_source, MERGE_SOURCES)):
    if value not in allowed:
      raise ValueError(f"eval.segmenters.{name}.{field}={value!r}: choose one of "
                       f"{list(allowed)}")
  if segmenter.uses_pixels and not (segmenter.cluster == "kmeans" and segmenter.split):
    raise ValueError(f"eval.segmenters.{name}: a split or merge by the image (split_source="
                     f"{segmenter.split_source!r}, merge_source={segmenter.merge_source!r}) "
                     "needs cluster='kmeans' and split=True (regions drawn by its clusters)")
  if segmenter.merge_source == "tap_or_pixels" and not (
      segmenter.colour_threshold > 0 and segmenter.tap_merge_threshold > 0):
    raise ValueError(f"eval.segmenters.{name}: merge_source='tap_or_pixels' compares "
                     "colours under colour_merge_threshold (or merge_threshold) and the tap "
                     f"under tap_merge_threshold (now {segmenter.colour_threshold} and "
                     f"{segmenter.tap_merge_threshold}): set both above 0")
  if segmenter.split_source == "pixels_and_tap" and segmenter.merge_source == "tap_or_pixels":
    raise ValueError(f"eval.segmenters.{name}: split_source='pixels_and_tap' cuts colour "
                     "regions where the tap's clusters differ, and merge_source="
                     "'tap_or_pixels' would join the pieces again by their one colour: "
                     "use merge_source='tap' with it")
  if segmenter.tap_cut_min_width < 0:
    raise ValueError(f"eval.segmenters.{name}.tap_cut_min_width="
                     f"{segmenter.tap_cut_min_width}: a width in pixels, 0 or more "
                     "(0 keeps every cut of the tap)")
  if segmenter.predicts_k and not (segmenter.merge and segmenter.num_clusters > 0):
    raise ValueError(f"eval.segmenters.{name}: k='predict' needs merge=True and "
                     "num_clusters > 0 (the clusters to merge from)")
  return segmenter


def configured(config: ml_collections.ConfigDict) -> list[Segmenter]:
  """The segmenters `config.eval.segmenter_names` selects, in that order."""
  ev = config.eval
  missing = [n for n in ev.segmenter_names if n not in ev.segmenters]
  if missing:
    raise ValueError(f"eval.segmenter_names lists {missing}, which eval.segmenters does "
                     f"not define (defined: {sorted(ev.segmenters.keys())})")
  return [from_config(n, ev.segmenters[n], ev.kmeans.fixed_k) for n in ev.segmenter_names]


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
      tol=kmeans_config.tol, metric=metric, init=kmeans_config.init,
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


def postprocess(segmenter: Segmenter, labels: jax.Array, x: jax.Array, target: jax.Array,
                threshold: jax.Array, *, max_regions: int, cap: int
                ) -> tuple[jax.Array, jax.Array]:
  """The segmenter's post-processing of cluster labels [B, h, w] of the features x
  [B, h, w, c]: (labels [B, h, w] in 0..cap-1, regions per image after absorbing
  specks; zeros without post-processing). See `segment` for the arguments."""
  if not segmenter.post_processes:
    return labels, jnp.zeros(labels.shape[:1], jnp.int32)
  _, h, w = labels.shape
  one_image = functools.partial(
      regions.postprocess, num_labels=segmenter.k_max, modal_size=segmenter.modal_size,
      split=segmenter.split, min_area=int(round(segmenter.min_area * h * w)),
      max_regions=max_regions, cap=cap, metric=segmenter.metric)
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
  if max_regions < 1:
    raise ValueError(f"eval.max_regions={max_regions}: the region slots must be at least 1")
  if segmenter.uses_pixels:
    return _segment_hybrid(segmenter, kmeans_config, features, pixels, num_clusters, keys,
                           target, threshold, is_pixels=is_pixels, max_regions=max_regions,
                           cap=cap, point_weights=point_weights)
  if segmenter.cluster == "argmax":
    if features.shape[-1] > segmenter.k_max:  # labels past k_max would not be counted
      raise ValueError(
          f"eval.segmenters.{segmenter.name}: the tap has {features.shape[-1]} channels "
          f"(slots), more than the {segmenter.k_max} labels it counts: set "
          f"--config.eval.segmenters.{segmenter.name}.num_clusters={features.shape[-1]}")
    x, labels = features, jnp.argmax(features, axis=-1).astype(jnp.int32)
  else:
    x, labels = transform_and_cluster(segmenter, kmeans_config, features, num_clusters, keys,
                                      is_pixels=is_pixels, point_weights=point_weights)
  return postprocess(segmenter, labels, x, target, threshold, max_regions=max_regions,
                     cap=cap)


def upsample_features(x: jax.Array, height: int, width: int) -> jax.Array:
  """[B, h, w, c] -> [B, height, width, c], each value repeated (nearest)."""
  _, h, w, _ = x.shape
  if height % h or width % w:
    raise ValueError(f"a tap of {h}x{w} does not divide the image's {height}x{width}")
  return jnp.repeat(jnp.repeat(x, height // h, axis=1), width // w, axis=2)


def _segment_hybrid(segmenter: Segmenter, kmeans_config: ml_collections.ConfigDict,
                    features: jax.Array, pixels: jax.Array | None, num_clusters: jax.Array,
                    keys: jax.Array, target: jax.Array, threshold: jax.Array, *,
                    is_pixels: bool, max_regions: int, cap: int,
                    point_weights: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """`segment` for a segmenter that reads the image: regions from the pixels'
  clusters (intersected with the tap's for 'pixels_and_tap'), each source's
  clusters majority-filtered on its own, then split, absorbed and merged by the
  region means of `merge_source`, all at the image's resolution."""
  if pixels is None:
    raise ValueError(f"eval.segmenters.{segmenter.name} reads the image (split_source="
                     f"{segmenter.split_source!r}, merge_source={segmenter.merge_source!r}) "
                     "but was given none")
  _, height, width, _ = pixels.shape
  colour, pixel_labels = transform_and_cluster(segmenter, kmeans_config, pixels,
                                               num_clusters, keys, is_pixels=True,
                                               point_weights=point_weights)
  k = segmenter.k_max
  modal = jax.vmap(functools.partial(regions.modal_filter, num_labels=k,
                                     size=segmenter.modal_size))
  labels, num_labels, tap = modal(pixel_labels), k, colour
  if not is_pixels:  # on the pixels the tap's clusters are the pixels': nothing to cut
    tap = transform(segmenter, features, is_pixels=False)
    if segmenter.split_source == "pixels_and_tap":  # clustered at the tap's resolution
      tap_labels = kmeans.upsample_labels(
          cluster(tap, num_clusters, keys, kmeans_config, k_max=k, metric=segmenter.metric),
          height, width)
      cuts = jax.vmap(functools.partial(regions.tap_cuts, num_labels=k,
                                        min_width=segmenter.tap_cut_min_width))
      labels, num_labels = cuts(labels, modal(tap_labels)), k * k
    tap = upsample_features(tap, height, width)
  if is_pixels or segmenter.merge_source == "pixels":
    x = colour
  elif segmenter.merge_source == "tap":
    x = tap
  else:  # colour in the tap's units: under the tap's threshold iff under its own
    x = (tap, colour * segmenter.colour_scale)
  one_image = functools.partial(
      regions.postprocess, num_labels=num_labels, modal_size=0, split=True,
      min_area=int(round(segmenter.min_area * height * width)), max_regions=max_regions,
      cap=cap, metric=segmenter.metric)
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
  time (docs/benchmarks.md). A segmenter that reads the image too (the hybrid)
  or takes each pixel's largest channel ('argmax') runs as one program.

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
    if not self.staged(segmenter):
      def whole(features, num_clusters, target, threshold, keys, true_labels, pixels):
        labels, counts = segment(segmenter, ev.kmeans, features, num_clusters, keys, target,
                                 threshold, is_pixels=is_pixels, max_regions=ev.max_regions,
                                 cap=cap, pixels=pixels)
        return (*self._score(labels, true_labels), counts)
      fn = self._program(("whole", segmenter.device_key, is_pixels), lambda: whole)
      return fn(features, num_clusters, target, threshold, keys, true_labels, pixels)

    names = segmenter.transforms_for("pixels" if is_pixels else "tap")
    x = features
    if names or features.dtype != jnp.float32:
      x = self._program(
          ("transform", names, is_pixels, segmenter.pca_dim, segmenter.xy_weight),
          lambda: functools.partial(transform, segmenter, is_pixels=is_pixels))(features)
    cluster_fn = self._program(
        ("kmeans", segmenter.k_max),
        lambda: lambda x, k, keys, cosine: cluster(x, k, keys, ev.kmeans,
                                                   k_max=segmenter.k_max, metric=cosine),
        in_specs=(P(sharding.AXIS),) * 3 + (P(),))
    labels = cluster_fn(x, num_clusters, keys, np.bool_(segmenter.metric == "cosine"))
    if not segmenter.post_processes:
      def score(labels, true_labels):
        tables, labels = self._score(labels, true_labels)
        return tables, labels, jnp.zeros(labels.shape[:1], jnp.int32)
      return self._program(("score",), lambda: score)(labels, true_labels)

    def finish(labels, x, target, threshold, true_labels):
      labels, counts = postprocess(segmenter, labels, x, target, threshold,
                                   max_regions=ev.max_regions, cap=cap)
      return (*self._score(labels, true_labels), counts)
    key = ("postprocess", segmenter.k_max, segmenter.modal_size, segmenter.split,
           segmenter.min_area, segmenter.metric)
    return self._program(key, lambda: finish)(labels, x, target, threshold, true_labels)
