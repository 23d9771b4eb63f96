"""Batched, jitted K-Means in JAX: Euclidean or cosine (spherical) Lloyd.

One call clusters a batch of B images, each a set of N points in D dimensions,
with its own number of clusters K_b <= k_max (the oracle K of the poster's
protocol). Clusters with index >= K_b are masked out: never assigned, their
centroids returned as zeros.

Algorithm (per image, per restart), following scikit-learn's `KMeans`:
  * init: greedy k-means++ (D^2 sampling with 2 + int(log(k_max)) local trials,
    the candidate that lowers the potential most wins). For cosine, D^2
    sampling runs on the L2-normalised points.
    Zero-weight points, and zero vectors under cosine, are never picked.
  * Lloyd iterations until the total squared centroid shift is <= tol times the
    mean per-feature (weighted) variance of that image's points, or `max_iter`.
  * Empty clusters are re-seeded at the points farthest from their centroids
    (distinct points when several are empty; same eligibility as above), as
    scikit-learn does; the donor point's old cluster keeps its mean until the
    next iteration.
  * The restart with the lowest inertia wins; a final assignment step makes the
    returned labels and inertia exactly those of the returned centroids.

Cosine = spherical k-means: points are L2-normalised (zero vectors stay zero),
a point goes to the centroid of highest cosine similarity, centroids are the
normalised (weighted) means, and inertia is sum_i w_i (1 - cos(x_i, c_{l_i})).

Scheduling. All B * num_restarts runs are independent. They are processed by a
pool of `parallel_runs` slots inside one `lax.while_loop`: each slot iterates
its run until that run converges on its own, then loads the next pending run,
and the loop ends when no run is left. With parallel_runs = B * num_restarts
this is plain "everything batched, converged runs frozen"; with fewer slots a
batch pays for the sum of its runs' iterations rather than for B * R times its
slowest run, and memory is bounded by parallel_runs * N * k_max distances
instead of B * R * N * k_max (540 MB at B=16, R=10, N=76,800, k_max=11). The
default fills a byte budget: ~4 MB on CPU, where runs whose working set stays
in cache are fastest (one slot at N = 76,800, eight at N = 300), and 2 GB on
accelerators, i.e. every run of a batch in flight at once.

Weights and upsampling. With `point_weights` w, the objective is
sum_i w_i d(x_i, c_{l_i}): k-means++ samples proportionally to w_i D^2, means
are weighted and the tolerance uses the weighted variance. Nearest-neighbour
upsampling by an integer factor f repeats each low-resolution pixel f^2 times,
so K-Means on the upsampled map has the same objective as weighted K-Means on
the small map with equal weights (f^2, or any constant): the same minimisers,
and Lloyd's iterations are identical step by step (same assignments, same
means, same variance hence same tolerance) given the same initial centroids.
k-means++ picks points, and every low-resolution pixel carries the same share
of the upsampled map, so restarts drawn from the small map are equal in
distribution to restarts drawn from the upsampled one.
Hence: cluster the small map, then `upsample_labels`. Unequal weights (counts
of duplicates) give the same equivalence for any multiplicities.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clevr_jax.segmentation import transforms

METRICS = ('euclidean', 'cosine')

# Bytes of working set (points in both layouts, residuals, scores) of the runs
# iterated at once. On CPU a run is fastest while its slots stay in cache: this
# budget takes 2.6-7.9x less CPU time than every run in flight at the taps' sizes
# (docs/reports/2026-12-07-house.md). On an accelerator the second budget puts
# every run of a batch in flight at once.
_CPU_BYTES = 4 << 20
_ACCELERATOR_BYTES = 2 << 30
# Block length of the two-level inverse-CDF sampler (a full-length cumsum over
# 76,800 points costs ~1 ms on XLA:CPU; block sums + two short cumsums do not).
_SAMPLER_BLOCK = 256


class KMeansResult(NamedTuple):
  """Per-image result of `kmeans` / `lloyd`.

  Attributes:
    labels: [B, N] int32 cluster of each point, in [0, num_clusters[b]).
    centroids: [B, k_max, D] centroids; rows >= num_clusters[b] are zeros.
      Unit vectors for the cosine metric.
    inertia: [B] objective of the returned labels and centroids: sum of
      weighted squared distances (euclidean) or of weighted 1 - cos (cosine).
    n_iter: [B] int32 Lloyd iterations of the returned (best) restart.
  """
  labels: jax.Array
  centroids: jax.Array
  inertia: jax.Array
  n_iter: jax.Array


class _Prepared(NamedTuple):
  x: jax.Array  # [B, N, D] centred (euclidean) or unit (cosine) points
  # [B, D, N], the same points feature-major: scores come out [K, N] and the
  # argmax over K runs across N in SIMD lanes (2.5-4x faster than [N, K]).
  xt: jax.Array
  sq_norms: jax.Array  # [B, N]
  weights: jax.Array  # [B, N]
  # [B, N] weights of the points that may become centroids: zero-weight
  # points may not, nor zero vectors under cosine (they have no direction).
  seed_weights: jax.Array
  offset: jax.Array  # [B, D] added back to euclidean centroids
  tol: jax.Array  # [B] absolute tolerance on the total squared shift


def _check(metric: str) -> None:
  if metric is not None and metric not in METRICS:
    raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')


def _cosine(metric):
  """True/False for a named metric; for a metric given as data (a boolean array,
  True = cosine), that traced value."""
  return metric == 'cosine' if isinstance(metric, str) else metric


def _either(cosine, if_cosine, if_euclidean):
  """if_cosine() or if_euclidean(): chosen while tracing when the metric is named,
  on the device (both computed, one kept) when it is data, so that one compiled
  program serves both metrics."""
  if isinstance(cosine, bool):
    return if_cosine() if cosine else if_euclidean()
  return jax.tree.map(lambda a, b: jnp.where(cosine, a, b), if_cosine(), if_euclidean())


def _prepare(points, point_weights, metric, tol) -> _Prepared:
  x = jnp.asarray(points)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if point_weights is None:
    w = jnp.ones(x.shape[:2], x.dtype)
  else:
    w = jnp.asarray(point_weights, x.dtype)
  total = jnp.sum(w, axis=1, keepdims=True)
  cosine = _cosine(metric)
  x = _either(cosine, lambda: transforms.l2_normalize(x), lambda: x)
  mean = jnp.einsum('bn,bnd->bd', w, x) / total
  # Centring does not change euclidean k-means but keeps the matmul-form
  # distance ||x||^2 - 2 x.c + ||c||^2 accurate in float32 (sklearn does too).
  centred = x - mean[:, None, :]
  variance = jnp.einsum('bn,bnd->bd', w, centred**2) / total
  tol_abs = jnp.where(tol == 0, 0.0, tol * jnp.mean(variance, axis=1))
  x, offset = _either(cosine, lambda: (x, jnp.zeros_like(mean)), lambda: (centred, mean))
  sq_norms = jnp.sum(x * x, axis=-1)
  seed_w = _either(cosine, lambda: jnp.where(sq_norms > 0, w, 0), lambda: w)
  return _Prepared(x, jnp.swapaxes(x, 1, 2), sq_norms, w, seed_w, offset,
                   tol_abs)


def _valid_clusters(num_clusters, k_max):
  return jnp.arange(k_max) < num_clusters[..., None]


def _assign(xt, sq_norms, centroids, num_clusters, metric):
  """Nearest centroid of each point, and the distance to it.

  Args:
    xt: [..., D, N] prepared points, feature-major.
    sq_norms: [..., N].
    centroids: [..., K, D].
    num_clusters: [...] clusters >= this are masked out.
    metric: 'euclidean' or 'cosine' (or a boolean array, True = cosine).

  Returns:
    labels [..., N] int32 and distances [..., N]: squared euclidean, or
    1 - cos.
  """
  k_max = centroids.shape[-2]
  cosine = _cosine(metric)
  dots = jnp.einsum('...kd,...dn->...kn', centroids, xt)
  # Euclidean: argmax of 2 x.c - ||c||^2 = argmin of ||x - c||^2; ||x||^2 added after.
  score = _either(cosine, lambda: dots,
                  lambda: 2 * dots - jnp.sum(centroids**2, axis=-1)[..., None])
  valid = _valid_clusters(num_clusters, k_max)[..., None]
  score = jnp.where(valid, score, -jnp.inf)
  labels = jnp.argmax(score, axis=-2).astype(jnp.int32)
  best = jnp.max(score, axis=-2)
  dist = _either(cosine, lambda: jnp.maximum(1 - best, 0),
                 lambda: jnp.maximum(sq_norms - best, 0))
  return labels, dist


def _cumsum(v):
  """Inclusive cumsum along the last (short) axis, as a triangular matmul.

  XLA:CPU compiles jnp.cumsum into a log-depth scan that is slow to compile
  and to run; for a few hundred entries a matmul is quicker at both.
  """
  n = v.shape[-1]
  upper = (jnp.arange(n)[:, None] <= jnp.arange(n)[None, :]).astype(v.dtype)
  return jnp.matmul(v, upper, precision=jax.lax.Precision.HIGHEST)


def _sample_proportional(u, p):
  """Indices drawn with probability proportional to p (inverse CDF).

  Two levels: a block by its cumulative mass, then a point in the block.
  Exact up to float rounding, O(N) work.

  Args:
    u: [num] uniform draws in [0, 1).
    p: [N] non-negative masses (not all zero, else index 0 is returned).

  Returns:
    [num] int32 indices.
  """
  n = p.shape[0]
  block = min(_SAMPLER_BLOCK, n)
  num_blocks = -(-n // block)
  blocks = jnp.pad(p, (0, num_blocks * block - n)).reshape(num_blocks, block)
  block_cdf = _cumsum(jnp.sum(blocks, axis=1))
  u = u * block_cdf[-1]
  b = jnp.minimum(jnp.sum(block_cdf[None, :] < u[:, None], axis=1),
                  num_blocks - 1)
  u_in_block = u - jnp.where(b > 0, block_cdf[b - 1], 0)
  inner_cdf = _cumsum(blocks[b])  # [num, block]
  i = jnp.minimum(jnp.sum(inner_cdf < u_in_block[:, None], axis=1), block - 1)
  return jnp.minimum(b * block + i, n - 1).astype(jnp.int32)


def _num_local_trials(k_max):
  # scikit-learn's choice, with k_max for K: K varies per image, shapes cannot.
  return 2 + int(math.log(k_max))


def _kmeans_plusplus_one(xt, sq_norms, w, seed_w, num_clusters, key, k_max):
  """Greedy k-means++ for one run: [D, N] prepared points -> [k_max, D]."""
  n_trials = _num_local_trials(k_max)
  # All draws up front: threefry inside the loop body is slow to compile.
  u = jax.random.uniform(key, (k_max, n_trials), xt.dtype)

  def step(i, carry):
    centroids, closest = carry
    # Step 0 draws the first centre proportionally to w alone (its trial 0,
    # as scikit-learn); later steps proportionally to w D^2. One loop body
    # for both halves the code XLA compiles.
    first = i == 0
    ids = _sample_proportional(u[i],
                               jnp.where(first, seed_w, seed_w * closest))
    cand = xt[:, ids].T  # [T, D]
    d2 = jnp.maximum(sq_norms[None, :] - 2 * cand @ xt
                     + jnp.sum(cand**2, axis=1)[:, None], 0)
    d2 = jnp.minimum(closest[None, :], d2)
    # The trial that lowers the potential most.
    best = jnp.where(first, 0, jnp.argmin(d2 @ w))
    take = i < num_clusters
    centroids = centroids.at[i].set(jnp.where(take, cand[best], 0))
    return centroids, jnp.where(take, d2[best], closest)

  init = (jnp.zeros((k_max, xt.shape[0]), xt.dtype),
          jnp.full(sq_norms.shape, jnp.inf, xt.dtype))
  centroids, _ = jax.lax.fori_loop(0, k_max, step, init)
  return centroids


def _chunked_vmap(f, xs, chunk):
  """vmap f over the leading axis, `chunk` at a time to bound memory.

  The chunk is rounded down to a divisor of the batch, so that the loop has
  one body (lax.map's remainder would compile a second copy).
  """
  b = jax.tree_util.tree_leaves(xs)[0].shape[0]
  chunk = max(d for d in range(1, min(chunk, b) + 1) if b % d == 0)
  if chunk == b:
    return jax.vmap(f)(xs)
  split = lambda a: a.reshape((b // chunk, chunk) + a.shape[1:])
  out = jax.lax.map(jax.vmap(f), jax.tree_util.tree_map(split, xs))
  return jax.tree_util.tree_map(lambda a: a.reshape((b,) + a.shape[2:]), out)


def _init_prepared(prep, num_clusters, keys, k_max, image_batch):
  """Initial centroids [B, R, k_max, D] in prepared space (k-means++); keys [B, R]."""
  def one_image(args):
    xt, sq, w, seed_w, k, image_keys = args
    f = lambda key: _kmeans_plusplus_one(xt, sq, w, seed_w, k, key, k_max)
    return jax.vmap(f)(image_keys)

  return _chunked_vmap(
      one_image,
      (prep.xt, prep.sq_norms, prep.weights, prep.seed_weights, num_clusters, keys),
      image_batch)


def _lloyd_pool(prep, num_clusters, run_image, init, *, max_iter, metric,
                parallel_runs):
  """Lloyd on M independent runs through a pool of `parallel_runs` slots.

  Args:
    prep: prepared points of the B images.
    num_clusters: [B] int32.
    run_image: [M] int32 image of each run.
    init: [M, K, D] initial centroids in prepared space.
    max_iter: iteration cap per run.
    metric: 'euclidean' or 'cosine'.
    parallel_runs: number of slots P <= M.

  Returns:
    centroids [M, K, D], inertia [M] (of the last assignment), n_iter [M].
  """
  m, k_max, _ = init.shape
  p = parallel_runs
  n = prep.x.shape[1]
  ks = jnp.arange(k_max)

  def points_of(img):
    return (prep.x[img], prep.xt[img], prep.sq_norms[img], prep.weights[img],
            prep.seed_weights[img])

  slot_run = jnp.arange(p, dtype=jnp.int32)
  img = run_image[slot_run]
  state = dict(
      slot_run=slot_run, img=img, pts=points_of(img),
      c=init[:p], it=jnp.zeros(p, jnp.int32), next_run=jnp.int32(p),
      out_c=jnp.zeros_like(init), out_inertia=jnp.zeros(m, init.dtype),
      out_iter=jnp.zeros(m, jnp.int32))

  def cond(s):
    return jnp.any(s['slot_run'] < m)

  def body(s):
    (x, xt, sq, w, seed_w), c = s['pts'], s['c']
    k = num_clusters[s['img']]
    labels, dist = _assign(xt, sq, c, k, metric)
    inertia = jnp.sum(w * dist, axis=1)
    # One scatter-add over all slots: segment id = slot * k_max + label. It
    # sums residuals x - c: the mean is c + mean(x - c), and float32 sums of
    # small residuals round far less than sums of the points themselves (a
    # low-res map and its upsampled copy then stay identical step by step).
    seg = (labels + (jnp.arange(p, dtype=jnp.int32) * k_max)[:, None]).ravel()
    resid = w[..., None] * (x - jnp.take_along_axis(c, labels[..., None], 1))
    sums = jax.ops.segment_sum(resid.reshape(p * n, -1), seg,
                               p * k_max).reshape(c.shape)
    counts = jax.ops.segment_sum(w.ravel(), seg, p * k_max).reshape(p, k_max)
    valid = ks[None, :] < k[:, None]
    nonempty = counts > 0
    new_c = c + sums / jnp.where(nonempty, counts, 1)[..., None]
    # Cosine: a zero mean (e.g. opposite points) has no direction: keep the old one.
    new_c = _either(
        _cosine(metric),
        lambda: jnp.where((jnp.linalg.norm(new_c, axis=-1) > 0)[..., None],
                          transforms.l2_normalize(new_c), c),
        lambda: new_c)
    new_c = jnp.where(nonempty[..., None], new_c, c)
    empty = valid & ~nonempty

    def reseed(new_c):
      # j-th empty cluster of a slot <- its j-th farthest point.
      _, far = jax.lax.top_k(jnp.where(seed_w > 0, dist, -1), k_max)  # [P, K]
      rank = jnp.clip(jnp.cumsum(empty, axis=1) - 1, 0, k_max - 1)
      idx = jnp.take_along_axis(far, rank, axis=1)
      pts = jnp.take_along_axis(x, idx[..., None], axis=1)
      return jnp.where(empty[..., None], pts, new_c)

    # Rare: pay for the top-k only when some slot has an empty cluster.
    new_c = jax.lax.cond(jnp.any(empty), reseed, lambda c: c, new_c)
    new_c = jnp.where(valid[..., None], new_c, 0)
    shift = jnp.sum((new_c - c)**2, axis=(1, 2))
    it = s['it'] + 1
    active = s['slot_run'] < m
    done = active & ((shift <= prep.tol[s['img']]) | (it >= max_iter))

    out_idx = jnp.where(done, s['slot_run'], m)  # m: dropped
    out_c = s['out_c'].at[out_idx].set(new_c, mode='drop')
    out_inertia = s['out_inertia'].at[out_idx].set(inertia, mode='drop')
    out_iter = s['out_iter'].at[out_idx].set(it, mode='drop')

    # Free slots take the next pending runs, in order.
    free = done | ~active
    cand = s['next_run'] + jnp.cumsum(free, dtype=jnp.int32) - 1
    loaded = free & (cand < m)
    slot_run = jnp.where(loaded, cand, jnp.where(free, m, s['slot_run']))
    next_run = s['next_run'] + jnp.sum(loaded, dtype=jnp.int32)
    cand = jnp.minimum(cand, m - 1)
    new_img = jnp.where(loaded, run_image[cand], s['img'])
    c = jnp.where(loaded[:, None, None], init[cand], new_c)
    it = jnp.where(loaded, 0, it)
    # Copy an image's points into a slot only when the slot changes image.
    pts = jax.lax.cond(jnp.any(new_img != s['img']),
                       lambda: points_of(new_img), lambda: s['pts'])
    return dict(slot_run=slot_run, img=new_img, pts=pts, c=c, it=it,
                next_run=next_run, out_c=out_c, out_inertia=out_inertia,
                out_iter=out_iter)

  s = jax.lax.while_loop(cond, body, state)
  return s['out_c'], s['out_inertia'], s['out_iter']


def _slots(bytes_per_slot, cap):
  """How many runs (or images) to process at once within the byte budget."""
  budget = _CPU_BYTES if jax.default_backend() == 'cpu' else _ACCELERATOR_BYTES
  return max(1, min(cap, budget // max(1, bytes_per_slot)))


def _parallel_runs(requested, num_runs, n, d, k_max):
  if requested is not None:
    return max(1, min(requested, num_runs))
  return _slots(4 * n * (3 * d + k_max), num_runs)


def _finish(prep, num_clusters, centroids, n_iter, metric):
  """Final assignment of the chosen centroids; back to input space."""
  b, n, _ = prep.x.shape
  k_max = centroids.shape[1]
  labels, dist = _chunked_vmap(
      lambda a: _assign(*a, metric=metric),
      (prep.xt, prep.sq_norms, centroids, num_clusters),
      _slots(4 * n * (2 * prep.x.shape[2] + k_max), b))
  inertia = jnp.sum(prep.weights * dist, axis=1)
  valid = _valid_clusters(num_clusters, k_max)[..., None]
  centroids = jnp.where(valid, centroids + prep.offset[:, None, :], 0)
  return KMeansResult(labels, centroids, inertia, n_iter)


def _image_keys(key, batch):
  """[B] keys: a single key is split; a batch of B keys is used as is."""
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 0:
    return jax.random.split(key, batch)
  if key.shape != (batch,):
    raise ValueError(f'key must be one key or {batch} keys, got {key.shape}')
  return key


def _check_points(points, k_max):
  if points.ndim != 3:
    raise ValueError(f'points must be [B, N, D], got shape {points.shape}')
  if points.shape[1] < k_max:
    raise ValueError(f'need at least k_max={k_max} points, got '
                     f'{points.shape[1]}')


def _metric_args(metric):
  """(the static metric name or None, the metric as data or None)."""
  if isinstance(metric, str):
    return metric, None
  return None, jnp.asarray(metric, bool)


def _as_tol(tol):
  # Always a traced float32 scalar: the default and an explicit value (or
  # tol=-1 for "never stop") then share one compiled function.
  return jnp.asarray(tol, jnp.float32)


@functools.partial(
    jax.jit, static_argnames=('k_max', 'num_restarts', 'max_iter', 'metric',
                              'parallel_runs'))
def _kmeans(points, num_clusters, key, tol, point_weights, metric_data, *, k_max,
            num_restarts, max_iter, metric, parallel_runs):
  metric = metric_data if metric is None else metric
  b, n, d = points.shape
  num_clusters = jnp.clip(jnp.asarray(num_clusters, jnp.int32), 1, k_max)
  prep = _prepare(points, point_weights, metric, tol)
  keys = jax.vmap(lambda k: jax.random.split(k, num_restarts))(
      _image_keys(key, b))
  n_trials = _num_local_trials(k_max)
  # Per image: its points, and each restart's [trials, N] distances.
  init_c = _init_prepared(
      prep, num_clusters, keys, k_max,
      _slots(4 * n * (2 * d + num_restarts * (n_trials + 2)), b))
  m = b * num_restarts
  run_image = jnp.repeat(jnp.arange(b, dtype=jnp.int32), num_restarts)
  cents, inertia, n_iter = _lloyd_pool(
      prep, num_clusters, run_image, init_c.reshape((m,) + init_c.shape[2:]),
      max_iter=max_iter, metric=metric,
      parallel_runs=_parallel_runs(parallel_runs, m, n, d, k_max))
  best = jnp.argmin(inertia.reshape(b, num_restarts), axis=1)
  pick = jnp.arange(b) * num_restarts + best
  return _finish(prep, num_clusters, cents[pick], n_iter[pick], metric)


def kmeans(points: jax.Array,
           num_clusters: jax.Array,
           key: jax.Array,
           *,
           k_max: int,
           num_restarts: int = 10,
           max_iter: int = 300,
           tol: float = 1e-4,
           metric: str | jax.Array = 'euclidean',
           point_weights: jax.Array | None = None,
           parallel_runs: int | None = None) -> KMeansResult:
  """K-Means of each image's points, with restarts; the best restart wins.

  Jitted: one compile per shape and static setting (k_max, num_restarts,
  max_iter, metric, parallel_runs, weights or not); `tol`, `key` and
  `num_clusters` are traced.

  Args:
    points: [B, N, D] points (features of N pixels per image).
    num_clusters: [B] int32 clusters per image, 1 <= K_b <= k_max.
    key: one PRNG key (split into B image keys), or [B] keys, one per image
      (image b's restarts then depend only on key[b], so a batch reproduces
      per-image calls).
    k_max: static upper bound of num_clusters; sets the centroid shape.
    num_restarts: independent initialisations per image.
    max_iter: Lloyd iterations at most, per restart.
    tol: relative tolerance on the total squared centroid shift (times the
      mean per-feature variance of the image); a negative value never stops.
    metric: 'euclidean' or 'cosine' (spherical k-means); or a boolean scalar
      array (True = cosine), an input of the compiled program, so that one
      program serves both metrics (the evaluation's segmenters share it).
    point_weights: optional [B, N] non-negative weights (multiplicities).
    parallel_runs: restarts iterated at once (slots of the run pool); default
      from the problem size and backend. Changes speed and memory only.

  Returns:
    A `KMeansResult`.
  """
  named, data = _metric_args(metric)
  _check(named)
  points = jnp.asarray(points)
  _check_points(points, k_max)
  return _kmeans(points, num_clusters, key, _as_tol(tol), point_weights, data,
                 k_max=k_max, num_restarts=num_restarts, max_iter=max_iter,
                 metric=named, parallel_runs=parallel_runs)


@functools.partial(
    jax.jit, static_argnames=('max_iter', 'metric', 'parallel_runs'))
def _lloyd(points, centroids, num_clusters, tol, point_weights, *, max_iter,
           metric, parallel_runs):
  b, n, d = points.shape
  k_max = centroids.shape[1]
  num_clusters = jnp.clip(jnp.asarray(num_clusters, jnp.int32), 1, k_max)
  prep = _prepare(points, point_weights, metric, tol)
  init = jnp.asarray(centroids, prep.x.dtype)
  if metric == 'euclidean':
    init = init - prep.offset[:, None, :]
  else:
    init = transforms.l2_normalize(init)
  init = jnp.where(_valid_clusters(num_clusters, k_max)[..., None], init, 0)
  cents, _, n_iter = _lloyd_pool(
      prep, num_clusters, jnp.arange(b, dtype=jnp.int32), init,
      max_iter=max_iter, metric=metric,
      parallel_runs=_parallel_runs(parallel_runs, b, n, d, k_max))
  return _finish(prep, num_clusters, cents, n_iter, metric)


def lloyd(points: jax.Array,
          centroids: jax.Array,
          num_clusters: jax.Array,
          *,
          max_iter: int = 300,
          tol: float = 1e-4,
          metric: str = 'euclidean',
          point_weights: jax.Array | None = None,
          parallel_runs: int | None = None) -> KMeansResult:
  """Lloyd iterations from given initial centroids (one run per image).

  Args:
    points: [B, N, D].
    centroids: [B, k_max, D] initial centroids (normalised for cosine).
    num_clusters: [B] int32, <= k_max.
    max_iter: iteration cap.
    tol: relative tolerance, as in `kmeans`.
    metric: 'euclidean' or 'cosine'.
    point_weights: optional [B, N] weights.
    parallel_runs: images iterated at once; speed and memory only.

  Returns:
    A `KMeansResult`.
  """
  _check(metric)
  points = jnp.asarray(points)
  _check_points(points, 1)
  return _lloyd(points, centroids, num_clusters, _as_tol(tol), point_weights,
                max_iter=max_iter, metric=metric, parallel_runs=parallel_runs)


@functools.partial(jax.jit, static_argnames=('k_max', 'metric'))
def _init_centroids(points, num_clusters, key, point_weights, *, k_max, metric):
  b, n, d = points.shape
  num_clusters = jnp.clip(jnp.asarray(num_clusters, jnp.int32), 1, k_max)
  prep = _prepare(points, point_weights, metric, 0.0)
  keys = _image_keys(key, b)[:, None]
  c = _init_prepared(prep, num_clusters, keys, k_max,
                     _slots(4 * n * (2 * d + 6), b))[:, 0]
  valid = _valid_clusters(num_clusters, k_max)[..., None]
  return jnp.where(valid, c + prep.offset[:, None, :], 0)


def init_centroids(points: jax.Array,
                   num_clusters: jax.Array,
                   key: jax.Array,
                   *,
                   k_max: int,
                   metric: str = 'euclidean',
                   point_weights: jax.Array | None = None) -> jax.Array:
  """Initial centroids of one run per image, drawn as `kmeans` draws each run.

  Args:
    points: [B, N, D].
    num_clusters: [B] int32.
    key: one key or [B] keys, as in `kmeans`.
    k_max: static bound of num_clusters.
    metric: 'euclidean' or 'cosine' (sampling on normalised points).
    point_weights: optional [B, N] weights.

  Returns:
    [B, k_max, D] centroids in input space (unit vectors for cosine); rows
    >= num_clusters are zeros.
  """
  _check(metric)
  points = jnp.asarray(points)
  _check_points(points, k_max)
  return _init_centroids(points, num_clusters, key, point_weights,
                         k_max=k_max, metric=metric)


def upsample_labels(labels: jax.Array, height: int, width: int) -> jax.Array:
  """Nearest-neighbour upsampling of [B, h, w] labels by integer factors.

  Args:
    labels: [B, h, w] labels of a low-resolution map.
    height: output height, a multiple of h.
    width: output width, a multiple of w.

  Returns:
    [B, height, width]: each low-resolution label repeated in its block,
    the same pixel layout as nearest upsampling of the features.
  """
  _, h, w = labels.shape
  if height % h or width % w:
    raise ValueError(f'({height}, {width}) is not a multiple of ({h}, {w})')
  return jnp.repeat(jnp.repeat(labels, height // h, axis=1), width // w, axis=2)


def image_keys(seed: int, index: jax.Array) -> jax.Array:
  """One K-Means key per image, folded from its index in its split: an image's
  clusters do not depend on which batch, device or process it falls in."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(index.astype(jnp.uint32))
