"""Post-processing of cluster maps on the devices: clusters -> regions in jax.numpy.

Pixel clusters are not objects: one cluster holds every object of a colour,
and sampling noise, shading and highlights scatter specks. The steps here
turn one image's cluster map into regions, with static shapes so that a
batch runs as one jitted program (`postprocess` is vmapped over images):

  modal_filter   optional majority vote in a size x size window (one-hot,
                 box sums, argmax; ties go to the smaller cluster)
  root_map       each pixel -> the first (raster order) pixel of its region: of
                 its 4-connected component of a cluster (label propagation with
                 pointer jumping in a while_loop) or of its whole cluster
  compact        regions under `min_area` pixels lose their label; the others are
                 numbered 0..n-1 in (cluster, first pixel) order, which is
                 SciPy's order in the reference, so the merge order is the same;
                 lost pixels take a neighbour's label, repeated until none is left
                 (the reference takes the Euclidean-nearest kept pixel's: the two
                 differ on a few pixels inside specks); at most R are kept
  merge          adjacent regions merge, closest area-weighted mean features
                 first, down to a target count or while the closest pair is
                 nearer than a threshold, and in any case until at most `cap`
                 remain: a while_loop over an R x R distance matrix

R (`max_regions`, config `eval.max_regions`) is the static number of region
slots after absorbing specks, the size of the merge's distance matrix. An
image with more regions of at least `min_area` pixels than R has its minimum
area raised until R remain (a noisy learned tap can leave hundreds of small
regions): it then differs from the reference, which keeps them all.
`postprocess` returns each image's count of regions before that, so that the
caller can say so and name the field (see `segmenters.check_region_counts`).

`tests/oracles/postprocess_reference.py` is the SciPy version of the
same steps, the tests' oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def modal_filter(labels: jax.Array, num_labels: int, size: int) -> jax.Array:
  """[h, w] ints in [0, num_labels) -> each pixel's most frequent label in its
  size x size window (edges repeated; a tie goes to the smaller label)."""
  if size <= 1:
    return labels
  counts = jax.nn.one_hot(labels, num_labels, dtype=jnp.int32)
  before, after = size // 2, size - 1 - size // 2  # SciPy's window placement
  h, w = labels.shape
  padded = jnp.pad(counts, ((before, after), (0, 0), (0, 0)), mode="edge")
  counts = sum(padded[d:d + h] for d in range(size))
  padded = jnp.pad(counts, ((0, 0), (before, after), (0, 0)), mode="edge")
  counts = sum(padded[:, d:d + w] for d in range(size))
  return jnp.argmax(counts, axis=-1).astype(jnp.int32)


def _shift(x: jax.Array, dy: int, dx: int, fill) -> jax.Array:
  """out[y, x] = x[y - dy, x - dx], `fill` where that falls outside."""
  h, w = x.shape
  padded = jnp.pad(x, ((1, 1), (1, 1)), constant_values=fill)
  return padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


_NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def components(labels: jax.Array) -> jax.Array:
  """[h, w] -> the flat index of the first pixel (raster order) of each pixel's
  4-connected component of equal labels.

  Every pixel starts as its own root; each round, a pixel takes the smallest
  root among its same-label neighbours, offers it to its root (scatter-min:
  whole trees hook at once) and jumps to its root's root, until no root changes.
  Roots only decrease and always name a pixel of the same component, so the
  fixpoint is the component's smallest index.
  """
  h, w = labels.shape
  n = h * w
  same = [labels == _shift(labels, dy, dx, -1) for dy, dx in _NEIGHBOURS]

  def neighbour_min(root):
    grid = root.reshape(h, w)
    best = grid
    for (dy, dx), ok in zip(_NEIGHBOURS, same):
      best = jnp.minimum(best, jnp.where(ok, _shift(grid, dy, dx, n), n))
    return best.reshape(n)

  def step(carry):
    root, _ = carry
    offered = neighbour_min(root)
    new = jnp.minimum(root.at[root].min(offered), offered)
    new = new[new][new[new]]  # pointer jumping: two levels up, twice
    return new, jnp.any(new != root)

  start = jnp.arange(n, dtype=jnp.int32)
  root, _ = jax.lax.while_loop(lambda c: c[1], step, (start, jnp.bool_(True)))
  return root


def root_map(labels: jax.Array, num_labels: int, split: bool) -> jax.Array:
  """Flat [h * w]: each pixel's region root, the flat index of its region's first
  pixel; a region is a 4-connected component of a cluster (`split`) or a cluster."""
  if split:
    return components(labels)
  flat = labels.reshape(-1)
  index = jnp.arange(flat.size, dtype=jnp.int32)
  first = jnp.full((num_labels,), flat.size, jnp.int32).at[flat].min(index)
  return first[flat]


def _rank_in_cluster_order(selected: jax.Array, cluster: jax.Array, num_labels: int
                           ) -> jax.Array:
  """For flat pixels `selected` [N] (roots) with `cluster` [N]: each one's rank in
  (cluster, index) order among the selected (others: anything)."""
  hot = jax.nn.one_hot(cluster, num_labels, dtype=jnp.int32) * selected[:, None]
  running = jnp.cumsum(hot, axis=0)  # [N, L] selected roots of each cluster so far
  before = jnp.cumsum(running[-1]) - running[-1]  # selected roots of smaller clusters
  return jnp.take_along_axis(running, cluster[:, None], 1)[:, 0] - 1 + before[cluster]


def compact(labels: jax.Array, root: jax.Array, num_labels: int, min_area: int,
            max_regions: int) -> tuple[jax.Array, jax.Array]:
  """(regions [h, w] in 0..R-1, the number of regions of at least `min_area` pixels).

  Regions of at least `min_area` pixels are kept (the largest if none is),
  numbered in (cluster, first pixel) order; pixels of smaller regions take the
  label of a 4-neighbour that has one, round after round. If more than R
  (`max_regions`) are that large, the image's minimum area is raised to the
  smallest at which at most R remain: its smallest regions are absorbed too.
  """
  h, w = labels.shape
  n = h * w
  cluster = labels.reshape(n)
  index = jnp.arange(n, dtype=jnp.int32)
  is_root = root == index
  area = jnp.zeros(n, jnp.int32).at[root].add(1)
  count = jnp.sum(is_root & (area >= min_area))

  def fits(a):  # at most R regions of `a` pixels or more
    return jnp.sum(is_root & (area >= a)) <= max_regions

  def bisect(_, bounds):  # the smallest area in [lo, hi] that fits (hi always fits)
    lo, hi = bounds
    mid = (lo + hi) // 2
    ok = fits(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  steps = max(1, (n + 1).bit_length())
  _, least = jax.lax.fori_loop(0, steps, bisect, (jnp.int32(min_area), jnp.int32(n + 1)))
  keep = is_root & (area >= least)
  # If no region is that large, keep the largest (the first of equals in region order).
  order_key = cluster * n + index
  largest = jnp.argmin(jnp.where(is_root & (area == jnp.max(area)), order_key,
                                 jnp.iinfo(jnp.int32).max))
  keep = jnp.where(jnp.any(keep), keep, index == largest)
  rank = _rank_in_cluster_order(keep, cluster, num_labels)
  slot = jnp.where(keep, rank, -1)
  regions = slot[root].reshape(h, w)

  def unlabelled(r):
    return jnp.any(r < 0)

  def fill(r):
    best = r
    for dy, dx in _NEIGHBOURS:
      best = jnp.maximum(best, _shift(r, dy, dx, -1))
    return jnp.where(r < 0, best, r)

  return jax.lax.while_loop(unlabelled, fill, regions), count


def _distances_to(one: jax.Array, means: jax.Array, metric: str) -> jax.Array:
  """[R]: distances of the mean `one` [c] to every mean [R, c] (the reference's forms)."""
  if metric == "cosine":
    norms = jnp.linalg.norm(means, axis=1) * jnp.linalg.norm(one)
    dots = jnp.dot(means, one, precision=_HIGHEST)
    return 1.0 - dots / jnp.where(norms > 0, norms, 1.0)
  return jnp.linalg.norm(means - one, axis=1)


def merge(regions: jax.Array, count: jax.Array, features: jax.Array | Sequence[jax.Array],
          target: jax.Array, threshold: jax.Array, *, max_regions: int, cap: int,
          metric: str) -> jax.Array:
  """Greedy merging of adjacent regions, the closest mean features first.

  Goes on while the closest adjacent pair is nearer than `threshold` and more
  than `target` regions remain, and in any case while more than `cap` remain
  (the label slots); a merged region's mean is the area-weighted mean of the
  two, and the pair (i < j) that merges first is the first closest in row-major
  order, as in the reference. Returns labels 0..n-1 in order of the surviving
  region's old number.

  Args:
    regions: int [h, w] in 0..count-1 (< max_regions).
    count: the number of regions.
    features: float [h, w, c] whose region means are compared; or several such
      maps (sources), and two regions are as near as the nearest source says
      (each source scaled beforehand so that its threshold is `threshold`).
    target: merge no further than this many regions (0: no target).
    threshold: merge only pairs nearer than this (inf: no threshold).
    max_regions: R, the static number of region slots.
    cap: merge at least down to this many regions.
    metric: 'euclidean' or 'cosine'.
  """
  r = max_regions
  flat = regions.reshape(-1)
  sources = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  area = jax.ops.segment_sum(jnp.ones_like(flat, jnp.float32), flat, r)
  means = tuple(jax.ops.segment_sum(x.reshape(flat.size, -1).astype(jnp.float32), flat, r)
                / jnp.maximum(area, 1.0)[:, None] for x in sources)

  def distances_to(one, means):  # [R]: by the source that puts them nearest
    return functools.reduce(jnp.minimum, [_distances_to(o, m, metric)
                                          for o, m in zip(one, means)])

  pairs_a = jnp.concatenate([regions[:, :-1].reshape(-1), regions[:-1, :].reshape(-1)])
  pairs_b = jnp.concatenate([regions[:, 1:].reshape(-1), regions[1:, :].reshape(-1)])
  adjacent = jnp.zeros((r, r), bool).at[pairs_a, pairs_b].set(True)
  eye = jnp.eye(r, dtype=bool)
  adjacent = (adjacent | adjacent.T) & ~eye
  dist = jax.lax.map(lambda one: distances_to(one, means), means)
  dist = jnp.where(adjacent, dist, jnp.inf)
  slots = jnp.arange(r)

  def body(carry):
    dist, adjacent, means, area, alive, parent, count, _ = carry
    best = jnp.argmin(dist)
    i, j = best // r, best % r
    d = dist.reshape(-1)[best]
    over_cap = count > cap
    stop = (count <= 1) | ~jnp.isfinite(d) | (
        ~over_cap & ((d >= threshold) | (count <= target)))
    # Merge j into i.
    merged = tuple((m[i] * area[i] + m[j] * area[j]) / (area[i] + area[j]) for m in means)
    new_means = tuple(m.at[i].set(one) for m, one in zip(means, merged))
    new_area = area.at[i].add(area[j])
    new_alive = alive.at[j].set(False)
    row = (adjacent[i] | adjacent[j]) & (slots != i) & (slots != j)
    new_adjacent = adjacent.at[i].set(row).at[:, i].set(row)
    new_adjacent = new_adjacent.at[j].set(False).at[:, j].set(False)
    drow = jnp.where(row & new_alive, distances_to(merged, new_means), jnp.inf)
    new_dist = dist.at[i].set(drow).at[:, i].set(drow)
    new_dist = new_dist.at[j].set(jnp.inf).at[:, j].set(jnp.inf)
    new_parent = jnp.where(parent == j, i, parent)
    keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(stop, o, n), old, new)
    return (keep(dist, new_dist), keep(adjacent, new_adjacent), keep(means, new_means),
            keep(area, new_area), keep(alive, new_alive), keep(parent, new_parent),
            keep(count, count - 1), stop)

  alive = slots < count
  carry = (dist, adjacent, means, area, alive, slots, count, jnp.bool_(False))
  _, _, _, _, alive, parent, _, _ = jax.lax.while_loop(lambda c: ~c[-1], body, carry)
  new_number = jnp.cumsum(alive) - 1
  return new_number[parent][regions].astype(jnp.int32)


def postprocess(labels: jax.Array, features: jax.Array | Sequence[jax.Array],
                target: jax.Array, threshold: jax.Array, *, num_labels: int,
                modal_size: int, split: bool, min_area: int, max_regions: int, cap: int,
                metric: str
                ) -> tuple[jax.Array, jax.Array]:
  """One image: cluster labels [h, w] (in 0..num_labels-1) and the features
  [h, w, c] they came from -> (region labels [h, w] in 0..cap-1, the number of
  regions of at least `min_area` pixels: more than `max_regions` means that
  the smallest of them were absorbed too).

  `target` and `threshold` are the merge's stopping rule (see `merge`): a target K
  with an infinite threshold merges to K; a threshold with target 0 predicts K;
  target = `cap` with an infinite threshold only brings the regions down to `cap`.
  """
  labels = modal_filter(labels.astype(jnp.int32), num_labels, modal_size)
  root = root_map(labels, num_labels, split)
  regions, count = compact(labels, root, num_labels, min_area, max_regions)
  regions = merge(regions, jnp.max(regions) + 1, features, target, threshold,
                  max_regions=max_regions, cap=cap, metric=metric)
  return regions, count
