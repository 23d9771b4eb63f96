"""Tests of clevr_jax.segmentation.kmeans on the pixels of two real CLEVR images.

Compiles dominate the runtime, so tests share a few array shapes: the full
images (2 x 76,800 points), a 4x-pooled map (4,800 points) and an 8x-pooled
batch of 4 images (1,200 points each).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
import threadpoolctl

from clevr_jax.segmentation import kmeans as km
from tests.helpers import near_ties

# Two real records, kept in the repository (see their README for licence and source).
_SAMPLES = pathlib.Path(__file__).resolve().parent / 'data' / 'clevr_with_masks_samples'
_H, _W = 240, 320


def _pool(image, factor):
  h, w, d = image.shape
  return image.reshape(h // factor, factor, w // factor, factor, d).mean(
      axis=(1, 3))


@pytest.fixture(scope='module')
def samples():
  """RGB images [2, 240, 320, 3] in [0, 1] (float32) and their true K."""
  images, ks = [], []
  for i in (0, 1):
    with np.load(_SAMPLES / f'sample_{i}.npz') as d:
      images.append(d['image'].astype(np.float32) / 255)
      masks = d['mask'].reshape(d['mask'].shape[0], -1)
      ks.append(int((masks > 0).any(axis=1).sum()))
  assert ks == [8, 9]  # background + 7 and + 8 objects
  return np.stack(images), np.array(ks, np.int32)


@pytest.fixture(scope='module')
def small_batch(samples):
  """[4, 1200, 3]: both images 8x-pooled, as is and mirrored."""
  images, _ = samples
  pooled = [_pool(im, 8) for im in images]
  pooled += [p[:, ::-1] for p in pooled]
  return np.stack([p.reshape(-1, 3) for p in pooled])


def _inertia64(points, labels, centroids):
  x = np.asarray(points, np.float64)
  c = np.asarray(centroids, np.float64)[np.asarray(labels)]
  return float(np.sum((x - c)**2))


def _xy(n_images):
  yy, xx = np.meshgrid(np.arange(_H), np.arange(_W), indexing='ij')
  xy = np.stack([yy, xx], -1).reshape(-1, 2).astype(np.float32) / _W
  return np.broadcast_to(xy, (n_images,) + xy.shape)


def _relu_features(images, channels=16, factor=2):
  """A fixed random projection + ReLU of 2x-pooled pixels: D > 3 features."""
  rng = np.random.default_rng(0)
  proj = rng.normal(size=(3, channels)).astype(np.float32)
  bias = rng.normal(scale=0.3, size=channels).astype(np.float32)
  pooled = np.stack([_pool(im, factor) for im in images])
  return np.maximum(pooled @ proj + bias, 0).reshape(len(images), -1, channels)


@pytest.mark.parametrize('features', ['rgb', 'rgb_xy', 'relu16'])
def test_inertia_within_one_percent_of_sklearn(samples, features):
  images, ks = samples
  points = images.reshape(2, -1, 3)
  if features == 'rgb_xy':
    points = np.concatenate([points, _xy(2)], axis=-1)
  elif features == 'relu16':
    points = _relu_features(images)
  result = km.kmeans(points, ks, jax.random.key(0), k_max=11)
  for b in range(2):
    labels = np.asarray(result.labels[b])
    assert labels.min() >= 0 and labels.max() < ks[b]
    ours = _inertia64(points[b], labels, result.centroids[b])
    # The returned inertia is that of the returned labels and centroids.
    np.testing.assert_allclose(result.inertia[b], ours, rtol=1e-4)
    # sklearn fits float32 points (its fast path, as ours); both inertias are
    # then evaluated in float64 on the same points.
    # One thread: on a busy 2-core machine its OpenMP pair crawls.
    with threadpoolctl.threadpool_limits(1):
      ref = KMeans(n_clusters=int(ks[b]), n_init=10, random_state=0).fit(
          points[b])
    theirs = _inertia64(points[b], ref.labels_, ref.cluster_centers_)
    assert ours <= 1.01 * theirs, (features, b, ours, theirs)


def _numpy_spherical_lloyd(points, centroids, k, max_iter, tol):
  """Plain spherical k-means in float64: the reference for the cosine path."""
  def normalize(v):
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1)

  x = normalize(points.astype(np.float64))
  c = normalize(centroids[:k].astype(np.float64))
  tol_abs = tol * np.mean(np.var(x, axis=0))
  for it in range(1, max_iter + 1):
    labels = np.argmax(x @ c.T, axis=1)
    new_c = c.copy()
    for j in range(k):
      s = x[labels == j].sum(axis=0)
      if np.linalg.norm(s) > 0:
        new_c[j] = s / np.linalg.norm(s)
    shift = np.sum((new_c - c)**2)
    c = new_c
    if shift <= tol_abs:
      break
  return np.argmax(x @ c.T, axis=1), c, it


def test_cosine_matches_numpy_spherical_lloyd(samples):
  images, ks = samples
  points = np.stack([_pool(im, 4).reshape(-1, 3) for im in images])
  init = km.init_centroids(points, ks, jax.random.key(1), k_max=11,
                           metric='cosine')
  result = km.lloyd(points, init, ks, metric='cosine')
  for b in range(2):
    k = int(ks[b])
    labels, centroids, n_iter = _numpy_spherical_lloyd(
        points[b], np.asarray(init[b]), k, max_iter=300, tol=1e-4)
    assert result.n_iter[b] == n_iter
    # float32 vs float64: only exact-tie pixels (duplicate colours sit on a
    # boundary) may go either way.
    ours = np.asarray(result.labels[b])
    differ = ours != labels
    assert differ.mean() < 1e-3
    unit = points[b] / np.linalg.norm(points[b], axis=-1, keepdims=True)
    gap = np.sum(unit[differ] * (centroids[labels[differ]]
                                 - centroids[ours[differ]]), axis=-1)
    np.testing.assert_allclose(gap, 0, atol=1e-5)
    np.testing.assert_allclose(result.centroids[b, :k], centroids, atol=1e-5)
    np.testing.assert_array_equal(result.centroids[b, k:], 0)
    cos = np.sum(unit * centroids[labels], axis=-1)
    # 1 - cos of near-parallel float32 vectors: ~1e-7 absolute per pixel.
    np.testing.assert_allclose(result.inertia[b], np.sum(1 - cos),
                               atol=1e-7 * len(cos))


def test_per_image_k_and_batch_equals_single_images(small_batch):
  ks = np.array([2, 5, 2, 5], np.int32)
  keys = jax.random.split(jax.random.key(2), 4)
  batch = km.kmeans(small_batch, ks, keys, k_max=5)
  for b in range(4):
    assert int(batch.labels[b].max()) == ks[b] - 1  # all K used, none beyond
    np.testing.assert_array_equal(batch.centroids[b, ks[b]:], 0)
    single = km.kmeans(small_batch[b:b + 1], ks[b:b + 1], keys[b:b + 1],
                       k_max=5)
    # One image alone and in a batch: two compiled programs, equal but at near-ties.
    near_ties.assert_equal_but_near_ties(
        small_batch[b], single.labels[0], single.centroids[0], batch.labels[b],
        batch.centroids[b], "euclidean", what=f"image {b}")
    # Inertia: a float32 sum of N terms errs by N u relative at most, on either side.
    n = small_batch.shape[1]
    np.testing.assert_allclose(single.inertia[0], batch.inertia[b],
                               rtol=2 * n * near_ties.UNIT_ROUNDOFF)
  # Mirrored images hold the same points, but K-Means++ draws other starts in
  # another order, so the best of 10 restarts can be another local optimum, not
  # a rounding of the same one (float32 sums of 1,200 terms err by 1e-7 to 7e-5).
  # How far apart those optima lie is a property of these points, measured with
  # keys 2-6: up to 7e-5 (K=2) and 7.6e-4 (K=5) relative. 2e-3 bounds it with room
  # for another CPU's rounding; a wrong K or a lost restart costs whole percents.
  np.testing.assert_allclose(batch.inertia[:2], batch.inertia[2:], rtol=2e-3)


@pytest.mark.parametrize('metric', km.METRICS)
def test_metric_given_as_data_equals_the_named_metric(small_batch, metric):
  # One compiled program serves both metrics when the metric is an input: it must
  # compute what the named metric's own program computes (the same operations on
  # the chosen side), label for label.
  ks = np.array([2, 5, 3, 4], np.int32)
  keys = jax.random.split(jax.random.key(3), 4)
  named = km.kmeans(small_batch, ks, keys, k_max=5, metric=metric, num_restarts=3)
  data = km.kmeans(small_batch, ks, keys, k_max=5, metric=np.bool_(metric == 'cosine'),
                   num_restarts=3)
  # Both sides of each choice are computed, and XLA may fuse them otherwise: two
  # programs, whose labels may differ only at near-ties (the iteration counts too,
  # where a run's last centroid shift ties with the tolerance).
  for b in range(len(ks)):
    near_ties.assert_equal_but_near_ties(
        small_batch[b], data.labels[b], data.centroids[b], named.labels[b],
        named.centroids[b], metric, what=f"image {b}")
  np.testing.assert_allclose(data.centroids, named.centroids, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(data.inertia, named.inertia, rtol=1e-5)


def test_early_stop_per_image(small_batch):
  ks = np.array([2, 5, 2, 5], np.int32)
  keys = jax.random.split(jax.random.key(3), 4)  # signature as above
  converged = km.kmeans(small_batch, ks, keys, k_max=5, tol=1e-4)
  assert np.all(converged.n_iter < 300)
  assert len(set(np.asarray(converged.n_iter).tolist())) > 1  # stops on its own
  forced = km.kmeans(small_batch, ks, keys, k_max=5, tol=-1.0)
  np.testing.assert_array_equal(forced.n_iter, 300)


def test_more_clusters_than_distinct_points(small_batch):
  # Three distinct colours in images 0-2, one in image 3, K = 5: some clusters
  # must start or fall empty; each distinct point still gets its own cluster.
  colours = np.array([[0.1, 0.2, 0.3], [0.9, 0.1, 0.1], [0.2, 0.8, 0.2]],
                     np.float32)
  rng = np.random.default_rng(0)
  points = colours[rng.integers(0, 3, size=small_batch.shape[:2])]
  points[3] = colours[0]
  ks = np.full(4, 5, np.int32)
  keys = jax.random.split(jax.random.key(4), 4)
  result = km.kmeans(points, ks, keys, k_max=5)
  assert np.all(np.isfinite(result.centroids))
  assert np.all(np.isfinite(result.inertia))
  # Zero up to the float32 rounding of the matmul-form distance.
  np.testing.assert_allclose(result.inertia, 0, atol=1e-4)
  for b in range(4):
    # Each distinct colour has a cluster of its own.
    colour = np.argmax(np.all(points[b][:, None] == colours, axis=-1), axis=1)
    pairs = set(zip(colour.tolist(), np.asarray(result.labels[b]).tolist()))
    assert len(pairs) == len(set(colour.tolist())) == len(
        {label for _, label in pairs})
  assert int(result.labels.max()) < 5


@pytest.mark.parametrize('outliers', [False, True])
def test_empty_cluster_is_reseeded_in_the_data(samples, outliers):
  images, _ = samples
  points = _pool(images[0], 4).reshape(1, -1, 3)
  weights = None
  if outliers:  # far points of weight 0: farthest, yet not eligible as seeds
    points[0, :100] = 100.0
    weights = (np.arange(points.shape[1]) >= 100)[None].astype(np.float32)
  # Centroid 2 is far from every pixel: it starts empty.
  init = np.array([[[0.2, 0.2, 0.2], [0.6, 0.6, 0.6], [50.0, 50.0, 50.0]]],
                  np.float32)
  init = np.pad(init, ((0, 0), (0, 8), (0, 0)))
  result = km.lloyd(points, init, np.array([3]), point_weights=weights)
  assert np.all(np.isfinite(result.centroids))
  kept = slice(100 if outliers else 0, None)
  assert np.array_equal(np.unique(result.labels[0, kept]), [0, 1, 2])
  assert np.all(np.abs(result.centroids[0, 2]) <= 1)  # moved into the data


def test_cosine_zero_vectors_and_duplicate_centroids_give_no_nan(samples):
  images, ks = samples
  points = np.stack([_pool(im, 4).reshape(-1, 3) for im in images])
  points[0, :1000] = 0  # zero vectors have no direction
  init = np.repeat(points[:, :1], 11, axis=1)  # all centroids equal
  result = km.lloyd(points, init, ks, metric='cosine')
  assert np.all(np.isfinite(result.centroids))
  assert np.all(np.isfinite(result.inertia))
  norms = np.linalg.norm(result.centroids, axis=-1)
  for b in range(2):
    np.testing.assert_allclose(norms[b, :ks[b]], 1, atol=1e-5)
    assert len(np.unique(result.labels[b])) == ks[b]  # re-seeded apart


def test_upsample_labels_is_nearest_neighbour():
  labels = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  up = np.asarray(km.upsample_labels(jnp.asarray(labels), 12, 8))
  rows, cols = np.arange(12) // 4, np.arange(8) // 2
  np.testing.assert_array_equal(up, labels[:, rows][:, :, cols])
  with pytest.raises(ValueError):
    km.upsample_labels(jnp.asarray(labels), 10, 8)


def test_lloyd_on_small_map_equals_lloyd_on_upsampled_map(samples):
  images, _ = samples
  small = _pool(images[0], 4)  # [60, 80, 3]
  upsampled = np.repeat(np.repeat(small, 4, axis=0), 4, axis=1)
  rng = np.random.default_rng(5)
  init = small.reshape(-1, 3)[rng.choice(60 * 80, 11, replace=False)][None]
  k = np.array([8])
  lo = km.lloyd(small.reshape(1, -1, 3), init, k)
  hi = km.lloyd(upsampled.reshape(1, -1, 3), init, k)
  assert lo.n_iter[0] == hi.n_iter[0] > 1
  np.testing.assert_array_equal(
      km.upsample_labels(lo.labels.reshape(1, 60, 80), _H, _W).reshape(1, -1),
      hi.labels)
  np.testing.assert_allclose(lo.centroids, hi.centroids, atol=1e-5)
  np.testing.assert_allclose(16 * lo.inertia, hi.inertia, rtol=1e-4)


def test_weighted_lloyd_equals_lloyd_on_repeated_points(samples):
  images, _ = samples
  small = _pool(images[1], 4).reshape(-1, 3)  # 4,800 points
  # Multiplicities 1..31 summing to 76,800: the repeated map has the shape of
  # a full image (and shares its compiled function with the test above).
  rng = np.random.default_rng(6)
  counts = np.full(len(small), 16)
  for _ in range(2000):
    i, j = rng.integers(0, len(small), 2)
    if counts[i] > 1 and counts[j] < 31:
      counts[i] -= 1
      counts[j] += 1
  assert counts.sum() == _H * _W and counts.min() >= 1
  repeated = np.repeat(small, counts, axis=0)
  init = small[rng.choice(len(small), 11, replace=False)][None]
  k = np.array([9])
  weighted = km.lloyd(small[None], init, k,
                      point_weights=counts[None].astype(np.float32))
  plain = km.lloyd(repeated[None], init, k)
  assert weighted.n_iter[0] == plain.n_iter[0] > 1
  np.testing.assert_array_equal(np.repeat(weighted.labels[0], counts),
                                plain.labels[0])
  np.testing.assert_allclose(weighted.centroids, plain.centroids, atol=1e-5)
  np.testing.assert_allclose(weighted.inertia, plain.inertia, rtol=1e-4)


def test_zero_weight_points_are_ignored(small_batch):
  # Far outliers with weight 0 must neither seed nor pull any centroid.
  points = small_batch.copy()
  weights = np.ones(points.shape[:2], np.float32)
  points[:, ::3] = 100.0
  weights[:, ::3] = 0
  ks = np.array([2, 5, 2, 5], np.int32)
  result = km.kmeans(points, ks, jax.random.key(7), k_max=5,
                     point_weights=weights)
  assert np.all(np.abs(result.centroids) <= 1)
  clean = small_batch[:, np.arange(points.shape[1]) % 3 != 0]
  for b in range(4):
    kept = np.arange(points.shape[1]) % 3 != 0
    ours = _inertia64(clean[b], result.labels[b][kept], result.centroids[b])
    np.testing.assert_allclose(result.inertia[b], ours, rtol=1e-4)


def test_rejects_bad_arguments(small_batch):
  ks = np.full(4, 2, np.int32)
  with pytest.raises(ValueError):
    km.kmeans(small_batch, ks, jax.random.key(0), k_max=2, metric='manhattan')
  with pytest.raises(ValueError):
    km.kmeans(small_batch[:, :4], ks, jax.random.key(0), k_max=5)
