r"""Our batched K-Means against scikit-learn at the sizes of the U-Net's taps.

  python -m benchmarks.kmeans_benchmark [--batch=16 --restarts=10
      --sizes=76800x3,19200x16 --repeats=2]

Features are realistic rather than blobs: the two real CLEVR samples, shifted
and mirrored into `--batch` images, average-pooled to the tap's resolution and,
for D > 3, pushed through a fixed random 3x3 conv-like projection + ReLU to D
channels (raw RGB for D = 3, like tap 0). Every image uses K = `--k` clusters,
both sides k-means++ with `--restarts` restarts, Euclidean, tol 1e-4.

Columns: ours on one image and on the batch (ms, best of `--repeats`, compile
excluded and reported separately), scikit-learn on the same images one by one
(ms, the fastest of its thread settings), the speed-up of our batch over
scikit-learn, and the mean (and worst)
over images of our inertia / scikit-learn's, both evaluated in float64 on the
same points from each side's labels and centroids.
"""

import os
import time

from absl import app
from absl import flags
import jax
import numpy as np
from sklearn.cluster import KMeans
import threadpoolctl

from clevr_jax.segmentation import kmeans as km
from benchmarks import samples

_SAMPLES = flags.DEFINE_string(
    'samples', samples.SAMPLES_DIR,
    'Folder of sample_{0,1}.npz (key image: [240, 320, 3] uint8).')
_BATCH = flags.DEFINE_integer('batch', 16, 'Images per batch.')
_RESTARTS = flags.DEFINE_integer('restarts', 10, 'Restarts (n_init).')
_K = flags.DEFINE_integer('k', 11, 'Clusters per image.')
_SIZES = flags.DEFINE_list(
    'sizes', ['76800x3', '76800x8', '19200x16', '4800x32', '1200x64',
              '300x128'],
    'Tap sizes as POINTSxCHANNELS; points = 76800 / f^2 for a factor f.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed runs (best is kept).')
_PARALLEL_RUNS = flags.DEFINE_integer(
    'parallel_runs', None, 'Override the run-pool width of kmeans.')
_SKLEARN = flags.DEFINE_bool('sklearn', True, 'Also time scikit-learn.')
_SKLEARN_THREADS = flags.DEFINE_list(
    'sklearn_threads', ['1', 'all'],
    'OpenMP/BLAS thread limits to time scikit-learn with; the fastest is '
    'reported. On a busy machine its 2-thread OpenMP can run 3-40x slower '
    'than 1 thread, so both are tried by default.')

_H, _W = 240, 320
def _features(images, points, channels):
  """[B, points, channels] features of the size of one tap."""
  factor = int(round((_H * _W / points)**0.5))
  if factor * factor * points != _H * _W:
    raise ValueError(f'{points} points is not 76800 / f^2')
  b = len(images)
  x = images.reshape(b, _H // factor, factor, _W // factor, factor, 3).mean(
      axis=(2, 4))
  if channels == 3:
    return x.reshape(b, points, 3)
  # 3x3 neighbourhoods (edge-padded) through a fixed random projection + ReLU.
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  patches = np.concatenate(
      [padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
  rng = np.random.default_rng(channels)
  proj = rng.normal(scale=1 / 27**0.5, size=(27, channels)).astype(np.float32)
  bias = rng.normal(scale=0.1, size=channels).astype(np.float32)
  return np.maximum(patches @ proj + bias, 0).reshape(b, points, channels)


def _inertia64(points, labels, centroids):
  x = np.asarray(points, np.float64)
  c = np.asarray(centroids, np.float64)[np.asarray(labels)]
  return float(np.sum((x - c)**2))


def _time_ours(points, ks, key, repeats):
  """(compile s, best run ms, result) of km.kmeans on the points."""
  run = lambda: jax.block_until_ready(km.kmeans(
      points, ks, key, k_max=_K.value, num_restarts=_RESTARTS.value,
      parallel_runs=_PARALLEL_RUNS.value))
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = run()
    times.append(time.perf_counter() - start)
  return max(first - min(times), 0), 1e3 * min(times), result


def _benchmark(images, size):
  points_str, channels_str = size.lower().split('x')
  points = _features(images, int(points_str), int(channels_str))
  b = len(points)
  ks = np.full(b, _K.value, np.int32)
  keys = jax.random.split(jax.random.key(0), b)
  compile_1, ours_1, _ = _time_ours(points[:1], ks[:1], keys[:1],
                                    _REPEATS.value)
  compile_b, ours_b, result = _time_ours(points, ks, keys, _REPEATS.value)
  row = dict(size=size, compile_1=compile_1, ours_1=ours_1,
             compile_b=compile_b, ours_b=ours_b,
             iters=float(np.mean(result.n_iter)))
  if _SKLEARN.value:
    row['sklearn'] = float('inf')
    for threads in _SKLEARN_THREADS.value:
      limit = None if threads == 'all' else int(threads)
      with threadpoolctl.threadpool_limits(limit):
        start = time.perf_counter()
        fits = [KMeans(n_clusters=_K.value, n_init=_RESTARTS.value,
                       random_state=i).fit(points[i]) for i in range(b)]
        elapsed = 1e3 * (time.perf_counter() - start)
      if elapsed < row['sklearn']:
        row['sklearn'], row['threads'] = elapsed, threads
    ratios = [
        _inertia64(points[i], result.labels[i], result.centroids[i])
        / _inertia64(points[i], f.labels_, f.cluster_centers_)
        for i, f in enumerate(fits)]
    row['ratio'], row['worst'] = float(np.mean(ratios)), float(np.max(ratios))
  return row


def main(argv):
  del argv
  images = samples.sample_images(_SAMPLES.value, _BATCH.value)
  b = _BATCH.value
  print(f'K={_K.value}, {_RESTARTS.value} restarts, k-means++, euclidean, '
        f'tol 1e-4; jax {jax.__version__} on {jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, '
        f'batch {b}')
  header = (f'| size | compile (s) 1 / {b} | ours 1 image (ms) '
            f'| ours batch-{b} (ms) | sklearn {b} one by one (ms) | speed-up '
            f'| inertia ours/sklearn mean (worst) | ours mean iters |')
  print(header)
  print('|' + '---|' * header.count(' | ') + '---|')
  for size in _SIZES.value:
    r = _benchmark(images, size)
    sk = (f"{r['sklearn']:.0f} ({r['threads']} thr) "
          f"| {r['sklearn'] / r['ours_b']:.1f}x "
          f"| {r['ratio']:.4f} ({r['worst']:.4f})"
          if 'sklearn' in r else '- | - | -')
    print(f"| {r['size']} | {r['compile_1']:.1f} / {r['compile_b']:.1f} "
          f"| {r['ours_1']:.0f} | {r['ours_b']:.0f} | {sk} "
          f"| {r['iters']:.1f} |", flush=True)


if __name__ == '__main__':
  app.run(main)
