"""Tests of clevr_jax.metrics against hand-computed values and references."""

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from clevr_jax import metrics

T_SLOTS = 11  # the dataset's slot count


def _score(true, pred, num_true=None, valid=None, num_pred_slots=None):
  """Scores single images or batches given as nested lists / arrays."""
  true = np.asarray(true, np.int32)
  pred = np.asarray(pred, np.int32)
  if true.ndim == 2:
    true, pred = true[None], pred[None]
  if num_true is None:
    num_true = true.reshape(true.shape[0], -1).max(axis=1) + 1
  # A fixed slot count unless a test needs another: fewer compilations.
  num_pred_slots = num_pred_slots or 8
  return metrics.score_instances(
      jnp.asarray(true), jnp.asarray(pred), jnp.asarray(num_true),
      None if valid is None else jnp.asarray(valid),
      num_true_slots=T_SLOTS, num_pred_slots=num_pred_slots)


def _best_assignment(matrix: np.ndarray) -> float:
  """Maximum-weight assignment by dynamic programming over column subsets.

  An independent reference for linear_sum_assignment (plus padding): rows
  left unassigned, when there are more rows than columns, score 0.
  """
  rows, cols = matrix.shape

  @functools.lru_cache(maxsize=None)
  def best(row: int, used: int) -> float:
    if row == rows:
      return 0.0
    options = [best(row + 1, used)]  # the row meets a zero-padded column
    options += [matrix[row, c] + best(row + 1, used | 1 << c)
                for c in range(cols) if not used >> c & 1]
    return max(options)

  return best(0, 0)


# ----------------------------------------------------------------------------
# Contingency and IoU.


def test_contingency_matches_numpy_counts():
  rng = np.random.default_rng(0)
  true = rng.integers(-1, 6, size=(3, 7, 9))  # -1 and 5 fall outside [0, 5)
  pred = rng.integers(0, 5, size=(3, 7, 9))   # 4 falls outside [0, 4)
  table = np.asarray(metrics.contingency(jnp.asarray(true), jnp.asarray(pred),
                                         5, 4))
  expected = np.zeros((3, 5, 4), np.int64)
  for b in range(3):
    for t, p in zip(true[b].ravel(), pred[b].ravel()):
      if 0 <= t < 5 and 0 <= p < 4:
        expected[b, t, p] += 1
  np.testing.assert_array_equal(table, expected)


def test_iou_of_a_shifted_square_by_hand():
  # 4x4 image; a 2x2 object, predicted one column to the right.
  true = np.zeros((4, 4), np.int32)
  true[0:2, 0:2] = 1
  pred = np.zeros((4, 4), np.int32)
  pred[0:2, 1:3] = 1
  iou = np.asarray(metrics.iou_matrices(jnp.asarray(true)[None],
                                        jnp.asarray(pred)[None],
                                        num_true_slots=2, num_pred_slots=3))[0]
  # object/object: 2 shared of 6; background: 10 shared of 14; crossed: 2/14;
  # the empty third cluster overlaps nothing.
  np.testing.assert_allclose(
      iou, [[10 / 14, 2 / 14, 0], [2 / 14, 2 / 6, 0]], rtol=1e-6)


# ----------------------------------------------------------------------------
# Instance scores on hand-made scenes.


def _scene():
  """4x6 image: background plus three objects of 2, 4 and 2 pixels."""
  return np.array([[0, 1, 1, 0, 0, 0],
                   [0, 0, 0, 2, 2, 0],
                   [0, 0, 0, 2, 2, 0],
                   [3, 3, 0, 0, 0, 0]], np.int32)


def test_perfect_prediction_scores_one_under_any_relabelling():
  true = _scene()
  for perm in ([0, 1, 2, 3], [3, 0, 2, 1], [5, 2, 7, 0]):
    pred = np.asarray(perm)[true]
    scores = _score(true, pred)
    for name in metrics.INSTANCE_METRICS:
      assert getattr(scores, name)[0] == pytest.approx(1.0), (name, perm)


def test_shifted_object_by_hand():
  true = np.zeros((4, 4), np.int32)
  true[0:2, 0:2] = 1
  pred = np.zeros((4, 4), np.int32)
  pred[0:2, 1:3] = 1
  s = _score(true, pred)
  bg, obj = 10 / 14, 2 / 6
  assert s.poster_miou[0] == pytest.approx((bg + obj) / 2)  # 11/21
  assert s.clevrtex_miou[0] == pytest.approx((bg + obj) / 2)
  assert s.clevrtex_miou_fg[0] == pytest.approx(obj)
  assert s.mbo[0] == pytest.approx((bg + obj) / 2)
  assert s.mbo_fg[0] == pytest.approx(obj)
  assert s.ari[0] == pytest.approx(
      sk_metrics.adjusted_rand_score(true.ravel(), pred.ravel()), abs=1e-6)


def test_two_objects_merged_into_one_cluster():
  true = _scene()
  pred = np.where(true == 3, 1, true)  # objects 1 and 3 (2 px each) merged
  s = _score(true, pred)  # clusters 3.. left empty
  merged = 2 / 4
  # Poster: bg 1, obj2 1, obj1 0.5 (or obj3), the other 0; over 4 true masks.
  assert s.poster_miou[0] == pytest.approx((1 + 1 + merged) / 4)
  # ClevrTex: 4 true vs 3 non-empty predicted masks.
  assert s.clevrtex_miou[0] == pytest.approx((1 + 1 + merged) / 4)
  assert s.clevrtex_miou_fg[0] == pytest.approx((1 + merged) / 3)
  # mBO: both merged objects have 0.5 as their best overlap.
  assert s.mbo[0] == pytest.approx((1 + 1 + 2 * merged) / 4)
  assert s.mbo_fg[0] == pytest.approx((1 + 2 * merged) / 3)
  # FG-ARI: 8 fg pixels, merged objects are one predicted cluster.
  fg = true > 0
  assert s.fg_ari[0] == pytest.approx(
      sk_metrics.adjusted_rand_score(true[fg], pred[fg]), abs=1e-6)
  assert s.fg_ari[0] < 1.0


def test_one_object_split_into_two_clusters():
  true = _scene()
  pred = true.copy()
  pred[1:3, 4] = 4  # object 2 (4 px) split into two 2-px clusters
  s = _score(true, pred)
  half = 2 / 4
  assert s.poster_miou[0] == pytest.approx((3 + half) / 4)
  # ClevrTex penalises the extra cluster: 5 predicted masks.
  assert s.clevrtex_miou[0] == pytest.approx((3 + half) / 5)
  assert s.clevrtex_miou_fg[0] == pytest.approx((2 + half) / 4)
  assert s.mbo[0] == pytest.approx((3 + half) / 4)
  assert s.mbo_fg[0] == pytest.approx((2 + half) / 3)
  # Every pair split by the prediction lies inside one true mask.
  assert 0 < s.ari[0] < 1


def test_fewer_clusters_than_true_masks_zero_pads():
  # 2x8: background 10 px, objects 1..3 of 2 px; only two clusters predicted:
  # background + objects 2, 3 in one, object 1 exactly.
  true = np.array([[0, 0, 0, 0, 0, 1, 1, 2],
                   [0, 0, 0, 0, 0, 2, 3, 3]], np.int32)
  pred = np.where(true == 1, 1, 0)
  bg = 10 / 14
  small = 2 / 14
  for slots in (2, 8):  # empty clusters 2.. must count as missing, not help
    s = _score(true, pred, num_pred_slots=slots)
    # 4 true masks, 2 predictions: two true masks are matched to the padding.
    assert s.poster_miou[0] == pytest.approx((bg + 1) / 4)  # 3/7
    assert s.clevrtex_miou[0] == pytest.approx((bg + 1) / 4)
    assert s.clevrtex_miou_fg[0] == pytest.approx(1 / 3)
    assert s.mbo[0] == pytest.approx((bg + 1 + 2 * small) / 4)
    assert s.mbo_fg[0] == pytest.approx((1 + 2 * small) / 3)


def test_empty_true_slots_are_not_masks():
  true = _scene()
  true = np.where(true == 3, 4, true)  # slot 3 empty, slot 4 used
  pred = true.copy()
  s = _score(true, pred, num_true=[5])
  assert s.poster_miou[0] == pytest.approx(1.0)
  assert s.clevrtex_miou[0] == pytest.approx(1.0)
  assert s.mbo_fg[0] == pytest.approx(1.0)
  # A real miss still counts: drop object 4 into the background.
  s = _score(true, np.where(true == 4, 0, true), num_true=[5])
  bg_iou = 16 / 18  # background 16 px; predicted background 18 px
  assert s.poster_miou[0] == pytest.approx((bg_iou + 2) / 4)


def test_slots_at_or_above_num_true_are_ignored():
  true = _scene()
  s = _score(true, true.copy(), num_true=[3])  # declares object 3 absent
  # Only slots 0..2 are scored; all three are perfect.
  assert s.poster_miou[0] == pytest.approx(1.0)
  assert s.mbo[0] == pytest.approx(1.0)


def test_image_without_objects():
  true = np.zeros((3, 3), np.int32)
  pred = np.zeros((3, 3), np.int32)
  s = _score(true, pred)
  assert s.poster_miou[0] == pytest.approx(1.0)
  assert math.isnan(s.mbo_fg[0])
  assert math.isnan(s.clevrtex_miou_fg[0])
  assert math.isnan(s.fg_ari[0])  # no foreground pixel to score


def test_padding_examples_do_not_count():
  true = np.stack([_scene(), _scene(), _scene()])
  pred = np.stack([_scene(), np.zeros_like(_scene()), _scene()])
  valid = np.array([True, True, False])
  s = _score(true, pred, num_true=[4, 4, 4], valid=valid)
  assert np.all(np.isnan([getattr(s, n)[2] for n in metrics.INSTANCE_METRICS]))
  # Image 1 predicts everything as background: only background matched.
  bg = 16 / 24
  assert s.poster_miou[1] == pytest.approx(bg / 4)
  summary = metrics.summarize([s])
  assert summary["poster_miou"] == pytest.approx((1 + bg / 4) / 2)
  # A second batch enters the mean per image, not per batch.
  acc = metrics.MeanAccumulator()
  acc.add(s)
  acc.add(_score(_scene(), _scene()))
  assert acc.result()["poster_miou"] == pytest.approx((2 + bg / 4) / 3)
  assert acc.counts["poster_miou"] == 3
  assert acc.counts["fg_ari"] == 3


def test_device_layout_leading_dims_are_flattened():
  true = np.stack([_scene()] * 4).reshape(2, 2, 4, 6)
  pred = true.copy()
  pred[1, 0] = 0
  s = _score(true, pred, num_true=np.full((2, 2), 4))
  assert s.poster_miou.shape == (4,)
  np.testing.assert_allclose(s.poster_miou, [1, 1, 16 / 24 / 4, 1], rtol=1e-6)


# ----------------------------------------------------------------------------
# Hungarian matching.


def test_hungarian_miou_equals_exhaustive_assignment():
  rng = np.random.default_rng(1)
  for rows, cols in [(3, 3), (5, 3), (3, 6), (7, 7), (6, 2)]:
    iou = rng.random((rows, cols)) * (rng.random((rows, cols)) < 0.6)
    expected = _best_assignment(iou) / rows
    assert metrics.hungarian_miou(iou) == pytest.approx(expected)


def _poster_table(first_digit_a: int, first_digit_b: int) -> np.ndarray:
  """The poster's 10x9 IoU table (seed/segmentation_as_clusterization.txt).

  The OCR lost the first digit of two entries of column 7 (".55e-1",
  ".02e-1"); they are parameters here.
  """
  t = np.zeros((10, 9))
  t[0] = [1.06e-3, 1.58e-1, 1.03e-1, 4.09e-1, 1.16e-4, 2.26e-1, 7.2e-5,
          9.90e-2, 1.13e-4]
  t[1, [3, 5, 6, 7]] = [3.49e-5, 6.21e-5, (first_digit_a + .55) / 10, 3.40e-3]
  t[2, [3, 4, 8]] = [1.09e-3, 2.56e-1, 5.28e-4]
  t[3, [6, 7]] = [(first_digit_b + .02) / 10, 1.90e-3]
  t[4, [3, 4]] = [8.97e-4, 6.80e-1]
  t[5, [0, 3]] = [2.80e-1, 5.66e-4]
  t[6, [0, 3, 4, 8]] = [6.43e-1, 5.85e-4, 2.47e-2, 2.16e-4]
  t[7, 7] = 3.84e-3
  t[8, [0, 3, 4, 8]] = [1.92e-4, 2.80e-3, 9.63e-4, 9.69e-1]
  t[9, 7] = 7.16e-4
  return t


@pytest.mark.parametrize("digits", [(0, 0), (9, 1), (2, 8), (9, 9)])
def test_poster_table(digits):
  table = _poster_table(*digits)
  score = metrics.hungarian_miou(table)
  assert score == pytest.approx(_best_assignment(table) / 10)
  # Whatever the lost digits, the strong pairs are matched and 10 rows share
  # the 9 columns: score = (0.409 + 0.680 + 0.643 + 0.969 + column 6's winner
  # + small leftovers) / 10.
  strong = 0.409 + 0.680 + 0.643 + 0.969 + table[[1, 3], 6].max()
  assert strong / 10 <= score <= (strong + 0.01) / 10


# ----------------------------------------------------------------------------
# ARI.


def _ari(true, pred, num_slots=None):
  num_slots = num_slots or int(max(true.max(), pred.max())) + 1
  table = metrics.contingency(jnp.asarray(true), jnp.asarray(pred),
                              num_slots, num_slots)
  return (np.asarray(metrics.adjusted_rand_index(table)),
          np.asarray(metrics.foreground_ari(table)))


@pytest.mark.parametrize("shape,num_true,num_pred", [
    ((4, 1, 7), 2, 3), ((3, 8, 8), 5, 5), ((2, 33, 17), 11, 4),
    ((2, 240, 320), 11, 11), ((1, 240, 320), 3, 11)])
def test_ari_against_sklearn_on_random_labels(shape, num_true, num_pred):
  rng = np.random.default_rng(sum(shape))
  true = rng.integers(0, num_true, size=shape)
  # Half random, half correlated with the truth, so ARI is not only ~0.
  pred = np.where(rng.random(shape) < 0.5, true % num_pred,
                  rng.integers(0, num_pred, size=shape))
  pred[0] = rng.integers(0, num_pred, size=shape[1:])
  ari, fg_ari = _ari(true, pred)
  for b in range(shape[0]):
    t, p = true[b].ravel(), pred[b].ravel()
    assert ari[b] == pytest.approx(sk_metrics.adjusted_rand_score(t, p),
                                   abs=1e-4)
    assert fg_ari[b] == pytest.approx(
        sk_metrics.adjusted_rand_score(t[t > 0], p[t > 0]), abs=1e-4)


def test_ari_near_degenerate_full_images():
  # Where the textbook float32 formula cancels: one huge cluster and a few
  # pixels elsewhere, ARI far from both 0 and 1.
  rng = np.random.default_rng(3)
  true = np.zeros((3, 240, 320), np.int64)
  pred = np.zeros((3, 240, 320), np.int64)
  true[0, :3, :5] = 1
  pred[0, :3, 2:7] = 1
  true[1, 100:110, 100:110] = 2
  true[1, 0, :40] = 1
  pred[1, 100:110, 101:110] = 1
  pred[2] = rng.random((240, 320)) < 1e-3
  true[2] = np.where(rng.random((240, 320)) < 0.5, pred[2], 0)
  ari, _ = _ari(true, pred)
  for b in range(3):
    expected = sk_metrics.adjusted_rand_score(true[b].ravel(), pred[b].ravel())
    assert ari[b] == pytest.approx(expected, abs=1e-4), b


def test_ari_degenerate_cases_follow_sklearn():
  single = np.zeros((1, 5, 5), np.int64)
  distinct = np.arange(25).reshape(1, 5, 5)
  one_off = single.copy()
  one_off[0, 2, 2] = 1
  for true, pred in [(single, single), (distinct, distinct),
                     (single, one_off), (one_off, single),
                     (single, distinct)]:
    expected = sk_metrics.adjusted_rand_score(true.ravel(), pred.ravel())
    assert _ari(true, pred, 25)[0][0] == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------
# Supervised metrics.


def _numpy_confusion(true, pred, num_classes):
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (true.ravel(), pred.ravel()), 1)
  return confusion


def test_confusion_and_class_metrics_against_numpy():
  rng = np.random.default_rng(4)
  true = rng.integers(0, 4, size=(5, 12, 10))
  true[:, :, 0] = 3
  # Class 3 is under-predicted.
  pred = np.where(rng.random(true.shape) < 0.7, true,
                  rng.integers(0, 3, size=true.shape))
  valid = np.array([True, False, True, True, False])
  expected = _numpy_confusion(true[valid], pred[valid], 4)
  confusion = metrics.confusion_matrix(jnp.asarray(true), jnp.asarray(pred), 4,
                                       jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(confusion), expected)

  t, p = true[valid].ravel(), pred[valid].ravel()
  ious = [np.sum((t == c) & (p == c)) / np.sum((t == c) | (p == c))
          for c in range(4)]
  result = metrics.confusion_metrics(expected)
  assert result.pixel_accuracy == pytest.approx(np.mean(t == p))
  np.testing.assert_allclose(result.per_class_iou, ious)
  assert result.mean_iou == pytest.approx(np.mean(ious))

  # The same through the batch API, split in two batches.
  acc = metrics.SupervisedAccumulator(4, ("bg", "sphere", "cylinder", "cube"))
  for part in (slice(0, 2), slice(2, 5)):
    acc.add(metrics.score_supervised(jnp.asarray(true[part]),
                                     jnp.asarray(pred[part]),
                                     jnp.asarray(valid[part]), num_classes=4))
  np.testing.assert_array_equal(acc.confusion, expected)
  out = acc.result()
  assert out["pixel_accuracy"] == pytest.approx(np.mean(t == p))
  assert out["iou/cube"] == pytest.approx(ious[3])
  assert out["mean_iou"] == pytest.approx(np.mean(ious))


def test_absent_class_has_undefined_iou():
  confusion = np.array([[5, 1, 0], [2, 4, 0], [0, 0, 0]])
  result = metrics.confusion_metrics(confusion)
  assert math.isnan(result.per_class_iou[2])
  assert result.mean_iou == pytest.approx((5 / 8 + 4 / 7) / 2)


def test_class_hungarian_miou_by_hand():
  true = np.array([[0, 0, 0, 1],
                   [0, 0, 3, 3],
                   [0, 0, 3, 3]], np.int32)
  swapped = np.select([true == 1, true == 3], [3, 1], true)
  shrunk = np.where((true == 3) & (np.arange(4) == 2), 0, true)
  scores = metrics.score_supervised(
      jnp.asarray(np.stack([true, swapped, shrunk])),
      jnp.asarray(np.stack([true, true, true])),
      jnp.asarray([True, True, True]), num_classes=4)
  # Swapped class labels: pixel accuracy drops, the matched IoU does not.
  # Shrunk: class 3 predicted on 4 px, true on 2 -> 2/4; background 7/9.
  np.testing.assert_allclose(scores.class_hungarian_miou,
                             [1.0, 1.0, (7 / 9 + 1 + 2 / 4) / 3], rtol=1e-6)
  accuracy = metrics.confusion_metrics(scores.confusion).pixel_accuracy
  assert accuracy == pytest.approx((12 + 7 + 10) / 36)
