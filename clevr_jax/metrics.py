"""Segmentation metrics: the poster's Hungarian mIoU and the field's standard.

Everything that scales with the number of pixels runs jitted and batched on the
device and reduces an image to its contingency table (pixel counts per pair of
true and predicted labels, [B, T, P]). IoU matrices, ARI / FG-ARI and confusion
matrices all follow from that table. Only the Hungarian matching, on tables of
at most a few dozen entries per image, runs on the host (SciPy).

Conventions (see `clevr_jax.schema`): true label 0 is the background; the
true masks of an image are its slots 0..num_true-1; a slot or cluster with no
pixels is not a mask (it is skipped on the true side and scores as "missing" on
the predicted side). Labels outside [0, num_slots) are ignored: their pixels
count in no mask.

Metric keys reported by `summarize` / `MeanAccumulator.result`:
  poster_miou       the poster's score: Hungarian on IoU, the true masks
                    (background included) against all predicted masks,
                    zero-padded to square; sum of matched IoU / #true masks.
  clevrtex_miou     ClevrTex's: the same matching between non-empty masks;
                    sum / max(#true masks, #predicted masks), so extra
                    predicted masks are penalised.
  clevrtex_miou_fg  ClevrTex's `mIoU_fg`: the same matching with the background
                    pair dropped from the sum and the denominator.
  mbo, mbo_fg       mean best overlap: per true mask, the best IoU of any
                    predicted mask; mean over true masks (fg: objects only).
  ari, fg_ari       adjusted Rand index over all pixels / over the pixels whose
                    true label is not the background.
Supervised (`SupervisedAccumulator.result`): pixel_accuracy, mean_iou,
iou/<class>, class_hungarian_miou (the poster's "0.9828": poster_miou over
class masks).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Counts are summed in float32: exact while they stay below 2**24.
_MAX_EXACT_PIXELS = 2**24
# Static arguments of the jitted label-map functions.
_SLOT_ARGS = ("num_true_slots", "num_pred_slots")


def _linear_sum_assignment(weights: np.ndarray, maximize: bool
                           ) -> tuple[np.ndarray, np.ndarray]:
  """scipy's Hungarian matching, imported on first use (scipy.optimize is about
  0.5 s of imports that training does not need before its first step)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  return optimize.linear_sum_assignment(weights, maximize=maximize)


# ----------------------------------------------------------------------------
# Device side: contingency tables and what follows from them.


@functools.partial(jax.jit, static_argnames=_SLOT_ARGS)
def contingency(true_labels: jax.Array, pred_labels: jax.Array,
                num_true_slots: int, num_pred_slots: int) -> jax.Array:
  """Pixel counts per (true label, predicted label) pair.

  Args:
    true_labels: int [..., H, W], values in [0, num_true_slots).
    pred_labels: int [..., H, W], values in [0, num_pred_slots).
    num_true_slots: T, static.
    num_pred_slots: P, static.

  Returns:
    int32 [..., T, P]; entry (t, p) counts pixels with true t and predicted p.
    Pixels whose label is out of range fall in no row or column.
  """
  if true_labels.shape != pred_labels.shape:
    raise ValueError(f"label maps differ in shape: {true_labels.shape} vs "
                     f"{pred_labels.shape}")
  *lead, height, width = true_labels.shape
  if height * width >= _MAX_EXACT_PIXELS:
    raise ValueError(f"{height}x{width} pixels overflow exact float32 counts")
  flat_true = true_labels.reshape(*lead, height * width)
  flat_pred = pred_labels.reshape(*lead, height * width)
  # One-hot matmul rather than a scatter-add: it maps to the MXU / tensor cores.
  # 0/1 entries are exact in any matmul precision (bf16 included) and the
  # float32 accumulator holds integers exactly below 2**24.
  true_hot = jax.nn.one_hot(flat_true, num_true_slots, dtype=jnp.float32)
  pred_hot = jax.nn.one_hot(flat_pred, num_pred_slots, dtype=jnp.float32)
  table = jnp.einsum("...nt,...np->...tp", true_hot, pred_hot,
                     preferred_element_type=jnp.float32)
  return jnp.round(table).astype(jnp.int32)


@jax.jit
def iou_from_contingency(table: jax.Array) -> jax.Array:
  """IoU of every (true mask, predicted mask) pair, [..., T, P] float32.

  Pairs whose union is empty (both masks empty) get IoU 0.
  """
  table = jnp.asarray(table, jnp.float32)
  true_area = table.sum(axis=-1)
  pred_area = table.sum(axis=-2)
  union = true_area[..., :, None] + pred_area[..., None, :] - table
  return jnp.where(union > 0, table / jnp.maximum(union, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=_SLOT_ARGS)
def iou_matrices(true_labels: jax.Array, pred_labels: jax.Array, *,
                 num_true_slots: int, num_pred_slots: int) -> jax.Array:
  """IoU matrices [..., T, P] of label maps [..., H, W]."""
  return iou_from_contingency(
      contingency(true_labels, pred_labels, num_true_slots, num_pred_slots))


@jax.jit
def adjusted_rand_index(table: jax.Array) -> jax.Array:
  """Adjusted Rand index per contingency table [..., T, P] -> [...] float32.

  Follows `sklearn.metrics.adjusted_rand_score`: 1.0 when neither labeling
  splits a pair the other joins (e.g. both a single cluster); NaN for a table
  with no pixels (nothing to score).

  The textbook form subtracts pair counts of order n**2 / 2 (3e9 for a 240x320
  image), which float32 (24-bit mantissa) cannot resolve. Instead each of the
  four pair-confusion counts is written as a sum of non-negative terms,
  n_ij * (an exact integer), so each carries only float32 rounding; and
  ARI = 2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn)), whose
  denominator is at least twice |tp tn| + |fn fp|, bounds the final error by a
  few float32 epsilons.
  """
  n_ij = jnp.asarray(table, jnp.float32)
  rows = n_ij.sum(axis=-1, keepdims=True)  # a_i
  cols = n_ij.sum(axis=-2, keepdims=True)  # b_j
  total = n_ij.sum(axis=(-2, -1), keepdims=True)
  # Each term counts, for one pixel of cell ij, the other pixels in a given
  # relation to it; all factors are integers below 2**24, hence exact.
  # Normalised by n**2 so the products below stay far from float32 limits.
  scale = 1.0 / jnp.maximum(total, 1.0)**2
  reduce = lambda x: jnp.sum(x * scale, axis=(-2, -1))
  same_both = reduce(n_ij * (n_ij - 1.0))                    # 2 tp
  same_true_only = reduce(n_ij * (rows - n_ij))              # 2 fn
  same_pred_only = reduce(n_ij * (cols - n_ij))              # 2 fp
  differ_both = reduce(n_ij * (total - rows - cols + n_ij))  # 2 tn
  tp, fn, fp, tn = same_both, same_true_only, same_pred_only, differ_both
  numerator = 2.0 * (tp * tn - fn * fp)
  denominator = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
  perfect = (fn == 0) & (fp == 0)  # sums of non-negatives: exactly zero
  ari = jnp.where(perfect, 1.0,
                  numerator / jnp.where(perfect, 1.0, denominator))
  return jnp.where(total[..., 0, 0] > 0, ari, jnp.nan)


@jax.jit
def foreground_ari(table: jax.Array) -> jax.Array:
  """FG-ARI: ARI over the pixels whose true label is not 0 (the background)."""
  return adjusted_rand_index(table[..., 1:, :])


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(true_classes: jax.Array, pred_classes: jax.Array,
                     num_classes: int, valid: jax.Array | None = None
                     ) -> jax.Array:
  """Confusion matrix [C, C] int32 (rows true, columns predicted).

  Args:
    true_classes: int [B, H, W] class per pixel.
    pred_classes: int [B, H, W] predicted class per pixel.
    num_classes: C, static.
    valid: bool [B]; images marked False (padding) are not counted.
  """
  tables = contingency(true_classes, pred_classes, num_classes, num_classes)
  if valid is not None:
    tables = jnp.where(valid[:, None, None], tables, 0)
  # Summed in int32: exact up to 2**31 pixels per batch.
  return tables.sum(axis=0)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _supervised_device_stats(true_classes, pred_classes, valid, *, num_classes):
  tables = contingency(true_classes, pred_classes, num_classes, num_classes)
  confusion = jnp.where(valid[:, None, None], tables, 0).sum(axis=0)
  return confusion, tables.sum(axis=-1), iou_from_contingency(tables)


# ----------------------------------------------------------------------------
# Host side: Hungarian matching on one image's IoU matrix.


def hungarian_miou(iou: np.ndarray, true_present: np.ndarray | None = None
                   ) -> float:
  """The poster's score of one image.

  Args:
    iou: [T, P] IoU of true masks (rows) against predicted masks (columns).
      Empty predicted masks have all-zero columns, so they score as missing.
    true_present: bool [T], the true masks to score (default: all rows).

  Returns:
    Sum of the IoU matched by a maximum-weight assignment, divided by the
    number of true masks; NaN when there is none. As in the poster, the matrix
    is zero-padded to square, so true masks left without a prediction score 0.
  """
  iou = np.asarray(iou, np.float64)
  if true_present is not None:
    iou = iou[np.asarray(true_present, bool)]
  num_true, num_pred = iou.shape
  if num_true == 0:
    return math.nan
  size = max(num_true, num_pred)
  square = np.zeros((size, size))
  square[:num_true, :num_pred] = iou
  rows, cols = _linear_sum_assignment(square, maximize=True)
  return float(square[rows, cols].sum() / num_true)


def clevrtex_miou(iou: np.ndarray, true_present: np.ndarray,
                  pred_present: np.ndarray,
                  background: int | None = 0) -> tuple[float, float]:
  """ClevrTex's mIoU of one image, with and without the background.

  Hungarian matching between the non-empty true and predicted masks; the sum
  of matched IoU is divided by max(#true masks, #predicted masks), so both
  missing and extra predicted masks lower the score. The foreground variant
  (ClevrTex's `mIoU_fg`) keeps the same matching and drops the background's
  pair from the sum and from the denominator.

  Denominator note: ClevrTex counts the matched pairs with either side
  non-empty, which depends on how the solver breaks ties between zero-IoU
  pairs; max(#true, #pred) is the tie-free value of that count.

  Args:
    iou: [T, P] IoU matrix.
    true_present: bool [T], non-empty true masks.
    pred_present: bool [P], non-empty predicted masks.
    background: the true slot of the background, or None if there is none.

  Returns:
    (miou, miou_fg); NaN where the denominator is 0.
  """
  true_present = np.asarray(true_present, bool)
  pred_present = np.asarray(pred_present, bool)
  true_ids = np.flatnonzero(true_present)
  sub = np.asarray(iou, np.float64)[true_ids][:, pred_present]
  rows, cols = _linear_sum_assignment(sub, maximize=True)
  matched = sub[rows, cols]
  pairs = max(sub.shape)
  miou = float(matched.sum() / pairs) if pairs else math.nan
  has_background = background is not None and bool(true_present[background])
  if has_background:
    fg_sum = matched[true_ids[rows] != background].sum()
    fg_pairs = pairs - 1
  else:
    fg_sum, fg_pairs = matched.sum(), pairs
  miou_fg = float(fg_sum / fg_pairs) if fg_pairs else math.nan
  return miou, miou_fg


def mean_best_overlap(iou: np.ndarray, true_present: np.ndarray) -> float:
  """mBO of one image: per true mask its best IoU with a prediction, mean."""
  best = np.asarray(iou, np.float64)[np.asarray(true_present, bool)]
  return float(best.max(axis=1).mean()) if best.size else math.nan


# ----------------------------------------------------------------------------
# Typed per-batch results and dataset averages.


class InstanceScores(NamedTuple):
  """Per-image instance-segmentation scores of one batch (NumPy, [B] each).

  Images with valid=False hold NaN. Other NaNs mark a metric that is
  undefined for that image (e.g. FG scores of an image without objects);
  averages skip them.
  """
  poster_miou: np.ndarray
  clevrtex_miou: np.ndarray
  clevrtex_miou_fg: np.ndarray
  mbo: np.ndarray
  mbo_fg: np.ndarray
  ari: np.ndarray
  fg_ari: np.ndarray
  valid: np.ndarray


INSTANCE_METRICS = tuple(f for f in InstanceScores._fields if f != "valid")


def nearest_index(size: int, new_size: int) -> np.ndarray:
  """For each of `new_size` output pixels along one axis, the input pixel (of
  `size`) under its centre: nearest-neighbour resizing's index map."""
  return np.minimum(((np.arange(new_size) + 0.5) * size / new_size).astype(np.int64), size - 1)


def resize_nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """[B, h, w, ...] host arrays (label maps, features) -> [B, height, width, ...],
  each output pixel taking the input pixel under its centre."""
  if x.shape[1:3] == (height, width):
    return x
  return x[:, nearest_index(x.shape[1], height)][:, :, nearest_index(x.shape[2], width)]


def contingency_host(true_labels: np.ndarray, pred_labels: np.ndarray,
                     num_true_slots: int, num_pred_slots: int) -> np.ndarray:
  """`contingency` in NumPy, for label maps already on the host: int64 [B, T, P].

  For post-processed labels, which are made on the host: counting them here
  saves sending them back to a device. Out-of-range labels count nowhere.
  """
  true_labels = np.asarray(true_labels).reshape(len(true_labels), -1).astype(np.int64)
  pred_labels = np.asarray(pred_labels).reshape(len(pred_labels), -1).astype(np.int64)
  if true_labels.shape != pred_labels.shape:
    raise ValueError(f"label maps differ in shape: {true_labels.shape} vs {pred_labels.shape}")
  inside = ((true_labels >= 0) & (true_labels < num_true_slots)
            & (pred_labels >= 0) & (pred_labels < num_pred_slots))
  cells = num_true_slots * num_pred_slots
  codes = np.where(inside, true_labels * num_pred_slots + pred_labels, cells)
  codes += (np.arange(len(codes)) * (cells + 1))[:, None]
  counts = np.bincount(codes.ravel(), minlength=len(codes) * (cells + 1))
  return counts.reshape(len(codes), cells + 1)[:, :cells].reshape(
      -1, num_true_slots, num_pred_slots)


@jax.jit
def _table_stats(table):
  return iou_from_contingency(table), adjusted_rand_index(table), foreground_ari(table)


def score_tables(tables: np.ndarray, num_true: np.ndarray,
                 valid: np.ndarray | None = None) -> InstanceScores:
  """Scores a batch of contingency tables [B, T, P] (true slots x predicted labels).

  Args:
    tables: int [B, T, P] pixel counts (see `contingency`).
    num_true: int [B], the number of true slots of each image (background
      included); slots at or above it are not masks. Empty slots below it
      are skipped too.
    valid: bool [B]; False marks padding images, which are not scored.

  Returns:
    InstanceScores with one entry per image.
  """
  tables = np.asarray(tables)
  num_images, num_true_slots, _ = tables.shape
  iou, ari, fg_ari = jax.device_get(_table_stats(jnp.asarray(tables, jnp.int32)))
  num_true = np.broadcast_to(np.asarray(num_true), (num_images,))
  valid = (np.ones(num_images, bool) if valid is None else
           np.broadcast_to(np.asarray(valid, bool), (num_images,)))
  scores = {name: np.full(num_images, np.nan) for name in INSTANCE_METRICS}
  scores["ari"][valid] = ari[valid]
  scores["fg_ari"][valid] = fg_ari[valid]
  slots = np.arange(num_true_slots)
  for b in np.flatnonzero(valid):
    true_present = (tables[b].sum(axis=1) > 0) & (slots < num_true[b])
    pred_present = tables[b].sum(axis=0) > 0
    scores["poster_miou"][b] = hungarian_miou(iou[b], true_present)
    scores["clevrtex_miou"][b], scores["clevrtex_miou_fg"][b] = clevrtex_miou(
        iou[b], true_present, pred_present)
    scores["mbo"][b] = mean_best_overlap(iou[b], true_present)
    scores["mbo_fg"][b] = mean_best_overlap(iou[b], true_present & (slots > 0))
  return InstanceScores(valid=valid, **scores)


class KScores(NamedTuple):
  """|predicted K - true K| per image, for segmenters that predict K."""
  k_error: np.ndarray
  valid: np.ndarray


def k_error(tables: np.ndarray, num_true: np.ndarray, valid: np.ndarray) -> KScores:
  """Predicted K = non-empty predicted masks; true K = `num_true` (background included)."""
  predicted = (np.asarray(tables).sum(axis=1) > 0).sum(axis=1)
  error = np.abs(predicted - np.asarray(num_true)).astype(np.float64)
  return KScores(np.where(valid, error, np.nan), np.asarray(valid, bool))


def score_instances(true_labels: jax.Array, pred_labels: jax.Array,
                    num_true: jax.Array, valid: jax.Array | None = None, *,
                    num_true_slots: int, num_pred_slots: int
                    ) -> InstanceScores:
  """Scores a batch of instance label maps against the truth.

  The contingency tables are counted on the device (jitted, batched), then
  scored by `score_tables`.

  Args:
    true_labels: int [..., H, W] true instance slots, 0 the background.
    pred_labels: int [..., H, W] cluster ids in [0, num_pred_slots).
    num_true: int [...], the number of true slots of each image (background
      included).
    valid: bool [...]; False marks padding images, which are not scored.
    num_true_slots: static T, e.g. 11 (`schema.MAX_SLOTS`).
    num_pred_slots: static P, the largest number of clusters.

  Returns:
    InstanceScores with one entry per image (leading dims flattened).
  """
  table = np.asarray(jax.device_get(contingency(
      true_labels, pred_labels, num_true_slots, num_pred_slots)))
  lead = table.shape[:-2]
  table = table.reshape(-1, num_true_slots, num_pred_slots)
  num_true = np.broadcast_to(np.asarray(num_true), lead).reshape(-1)
  if valid is not None:
    valid = np.broadcast_to(np.asarray(valid, bool), lead).reshape(-1)
  return score_tables(table, num_true, valid)


class MeanAccumulator:
  """Dataset means of per-image scores, accumulated batch by batch.

  Works with any NamedTuple of per-image arrays that has a `valid` field
  (InstanceScores, SupervisedScores). A metric's mean is over the valid images
  where it is defined (not NaN); `counts` says how many that was.
  """

  def __init__(self) -> None:
    self._sums: dict[str, float] = {}
    self._counts: dict[str, int] = {}

  def add(self, scores: NamedTuple) -> None:
    valid = np.asarray(scores.valid, bool).reshape(-1)
    for name, values in scores._asdict().items():
      values = np.asarray(values)
      if name == "valid" or values.shape != valid.shape:
        continue  # per-batch fields such as a confusion matrix
      values = values.astype(np.float64)[valid]
      defined = ~np.isnan(values)
      total = float(values[defined].sum())
      self._sums[name] = self._sums.get(name, 0.0) + total
      self._counts[name] = self._counts.get(name, 0) + int(defined.sum())

  @property
  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  def result(self) -> dict[str, float]:
    return {name: (self._sums[name] / count if count else math.nan)
            for name, count in self._counts.items()}


def summarize(scores: Iterable[InstanceScores]) -> dict[str, float]:
  """Dataset means of a sequence of per-batch scores (see MeanAccumulator)."""
  accumulator = MeanAccumulator()
  for batch in scores:
    accumulator.add(batch)
  return accumulator.result()


# ----------------------------------------------------------------------------
# Supervised (semantic) segmentation.


class ConfusionMetrics(NamedTuple):
  """Metrics of a confusion matrix (rows true, columns predicted)."""
  pixel_accuracy: float
  per_class_iou: np.ndarray  # [C]; NaN for a class absent from both sides
  mean_iou: float            # mean over the classes with a defined IoU


def confusion_metrics(confusion: np.ndarray) -> ConfusionMetrics:
  """Pixel accuracy, per-class IoU and mean IoU, in float64 on the host."""
  confusion = np.asarray(confusion, np.float64)
  hits = np.diag(confusion)
  union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class = np.where(union > 0, hits / union, np.nan)
    accuracy = hits.sum() / confusion.sum()
  mean_iou = (float(np.nanmean(per_class)) if np.any(union > 0) else math.nan)
  return ConfusionMetrics(float(accuracy), per_class, mean_iou)


class SupervisedScores(NamedTuple):
  """One batch of semantic segmentation scores (NumPy)."""
  confusion: np.ndarray             # [C, C] int64, valid images only
  class_hungarian_miou: np.ndarray  # [B], NaN for invalid images
  valid: np.ndarray                 # [B] bool


def score_supervised(true_classes: jax.Array, pred_classes: jax.Array,
                     valid: jax.Array | None = None, *, num_classes: int
                     ) -> SupervisedScores:
  """Scores a batch of class maps [B, H, W]; valid=False images not counted.

  `class_hungarian_miou` is the poster's supervised figure: per image, the
  class masks present in the truth matched to the predicted class masks with
  `hungarian_miou`.
  """
  num_images = true_classes.shape[0]
  valid = (np.ones(num_images, bool) if valid is None else
           np.asarray(valid, bool))
  confusion, true_area, iou = jax.device_get(_supervised_device_stats(
      true_classes, pred_classes, jnp.asarray(valid), num_classes=num_classes))
  per_image = np.full(num_images, np.nan)
  for b in np.flatnonzero(valid):
    per_image[b] = hungarian_miou(iou[b], true_area[b] > 0)
  return SupervisedScores(np.asarray(confusion, np.int64), per_image, valid)


class SupervisedAccumulator:
  """Confusion summed over batches (int64) and per-image means."""

  def __init__(self, num_classes: int,
               class_names: Sequence[str] | None = None) -> None:
    self.confusion = np.zeros((num_classes, num_classes), np.int64)
    self.class_names = (tuple(class_names) if class_names is not None else
                        tuple(str(c) for c in range(num_classes)))
    if len(self.class_names) != num_classes:
      raise ValueError("one class name per class")
    self._means = MeanAccumulator()

  def add(self, scores: SupervisedScores) -> None:
    self.confusion += scores.confusion
    self._means.add(scores)

  def result(self) -> dict[str, float]:
    metrics = confusion_metrics(self.confusion)
    out = {"pixel_accuracy": metrics.pixel_accuracy,
           "mean_iou": metrics.mean_iou}
    out.update({f"iou/{name}": float(value) for name, value
                in zip(self.class_names, metrics.per_class_iou)})
    out.update(self._means.result())
    return out
