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
  refine         optional: a few rounds in which each pixel takes, of its own
                 and its 4-neighbours' regions, the one of nearest mean feature
                 (the boundaries that the majority filter and the absorption moved
                 go back to the colour edges)
  shape_split    optional: a region that holds thick parts joined by a narrow
                 waist (two touching objects of one colour) is cut between the
                 peaks of its distance transform; the parts may not merge back
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
import math
from typing import Any

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# Added to the distance of two parts cut from one region (`shape_split`): above
# any merge threshold, so that only a target K or the label slots join them.
APART = 1e4


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
  4-connected component of equal labels."""
  return connected_roots(labels.shape, [
      ((dy, dx), labels == _shift(labels, dy, dx, -1)) for dy, dx in _NEIGHBOURS])


def connected_roots(shape: tuple[int, int],
                    links: Sequence[tuple[tuple[int, int], jax.Array]]) -> jax.Array:
  """The flat index of the first pixel (raster order) of each pixel's component,
  where `links` [((dy, dx), ok [h, w])] says that a pixel is joined to its
  neighbour at (y - dy, x - dx) wherever ok (links must be symmetric).

  Every pixel starts as its own root; each round, a pixel takes the smallest
  root among its linked neighbours, offers it to its root (scatter-min:
  whole trees hook at once) and jumps to its root's root, until no root changes.
  Roots only decrease and always name a pixel of the same component, so the
  fixpoint is the component's smallest index.
  """
  h, w = shape
  n = h * w

  def neighbour_min(root):
    grid = root.reshape(h, w)
    best = grid
    for (dy, dx), ok in links:
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


def _pair_distances(a: jax.Array, b: jax.Array, metric: str) -> jax.Array:
  """[...]: the distances of the vectors a [..., c] to those of b [..., c]."""
  if metric == "cosine":
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return 1.0 - jnp.sum(a * b, axis=-1) / jnp.where(norms > 0, norms, 1.0)
  return jnp.linalg.norm(a - b, axis=-1)


def refine(regions: jax.Array, features: jax.Array, *, steps: int, max_regions: int,
           metric: str) -> jax.Array:
  """[h, w]: `steps` rounds in which each pixel takes, of its own region and its
  4-neighbours' regions, the one whose mean feature (this round's) is nearest
  its own feature (its own on a tie); then the regions that are left numbered
  0..n-1 in their old order. A local K-Means on the region map: pixels that the
  majority filter or the speck absorption gave to a neighbour go back."""
  r = max_regions
  h, w = regions.shape
  x = features.reshape(h * w, -1).astype(jnp.float32)

  def one_round(_, labels):
    flat = labels.reshape(-1)
    area = jax.ops.segment_sum(jnp.ones_like(flat, jnp.float32), flat, r)
    means = jax.ops.segment_sum(x, flat, r) / jnp.maximum(area, 1.0)[:, None]
    candidates = jnp.stack([flat] + [_shift(labels, dy, dx, -1).reshape(-1)
                                     for dy, dx in _NEIGHBOURS])
    distance = jnp.where(candidates >= 0, _pair_distances(
        x[None], means[jnp.maximum(candidates, 0)], metric), jnp.inf)
    best = jnp.take_along_axis(candidates, jnp.argmin(distance, axis=0)[None], 0)[0]
    return best.reshape(h, w)

  labels = jax.lax.fori_loop(0, steps, one_round, regions)
  present = jnp.zeros(r, bool).at[labels].set(True)
  return (jnp.cumsum(present) - 1)[labels].astype(jnp.int32)


_DIAGONALS = ((1, 1), (1, -1), (-1, 1), (-1, -1))
_EIGHT = _NEIGHBOURS + _DIAGONALS
# Chamfer steps to the 8 neighbours: distances are lengths of 8-connected paths.
_STEPS = (1.0,) * 4 + (math.sqrt(2.0),) * 4
# Slack of the peak test: values compared there are copies of one another, or
# differ by far more than float32's rounding of sums of a few hundred steps.
_PEAK_TOLERANCE = 1e-3


def _fixpoint(update: Any, start: Any) -> Any:
  """`update` applied until nothing changes (a while_loop)."""
  def step(carry):
    old, _ = carry
    new = update(old)
    changed = functools.reduce(jnp.logical_or, [jnp.any(a != b) for a, b in zip(
        jax.tree.leaves(new), jax.tree.leaves(old))])
    return new, changed
  return jax.lax.while_loop(lambda c: c[1], step, (start, jnp.bool_(True)))[0]


def _adjacency(regions: jax.Array, r: int) -> jax.Array:
  """bool [R, R]: regions that share a horizontal or vertical pixel edge."""
  pairs_a = jnp.concatenate([regions[:, :-1].reshape(-1), regions[:-1, :].reshape(-1)])
  pairs_b = jnp.concatenate([regions[:, 1:].reshape(-1), regions[1:, :].reshape(-1)])
  adjacent = jnp.zeros((r, r), bool).at[pairs_a, pairs_b].set(True)
  return (adjacent | adjacent.T) & ~jnp.eye(r, dtype=bool)


def _on_edge(regions: jax.Array, r: int) -> jax.Array:
  """bool [R]: regions that touch the image's border."""
  edge = jnp.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
  return jnp.zeros(r, bool).at[edge].set(True)


def hole_hosts(regions: jax.Array, max_area: int, max_regions: int) -> jax.Array:
  """[h, w]: each pixel's region, or for a region enclosed by one other of at most
  `max_area` pixels (a highlight, a cylinder's top) that region's: the regions
  with their holes filled. Objects on the floor are not holes of the floor."""
  r = max_regions
  adjacent = _adjacency(regions, r)
  on_edge = _on_edge(regions, r)
  area = jnp.zeros(r, jnp.int32).at[regions].add(1)
  slots = jnp.arange(r)
  owner = jnp.argmax(adjacent, 1)
  enclosed = (jnp.sum(adjacent, 1) == 1) & ~on_edge & (area[owner] <= max_area)
  host = jnp.where(enclosed, owner, slots)
  for _ in range(3):  # a hole's hole belongs to the outer host too
    host = host[host]
  return host[regions]


def distance_to_edge(filled: jax.Array, candidate: jax.Array) -> jax.Array:
  """float [h, w]: each candidate pixel's chamfer distance (steps 1 and sqrt 2) to
  the nearest pixel outside its region (the image's outside included); 0 elsewhere."""
  same = [filled == _shift(filled, dy, dx, -1) for dy, dx in _EIGHT]

  def update(d):
    best = jnp.full(d.shape, jnp.inf, d.dtype)
    for ok, (dy, dx), step in zip(same, _EIGHT, _STEPS):
      best = jnp.minimum(best, jnp.where(ok, _shift(d, dy, dx, 0.0) + step, step))
    return jnp.where(candidate, best, 0.0)
  return _fixpoint(update, jnp.where(candidate, jnp.inf, 0.0).astype(jnp.float32))


def peaks(filled: jax.Array, distance: jax.Array, *, min_radius: float, waist: float
          ) -> jax.Array:
  """bool [h, w]: the tops of the distance transform's peaks that stand on their
  own: at least `min_radius` high, and every path inside the region to a higher
  peak dips to `waist` times the peak's height or lower.

  Morphological reconstruction by dilation of waist * distance under the
  distance: a top stays at its own seed value exactly when no higher seed
  reaches it over a pass above that value.
  """
  same = [filled == _shift(filled, dy, dx, -1) for dy, dx in _EIGHT]
  seed = waist * distance

  def update(rec):
    best = rec
    for ok, (dy, dx) in zip(same, _EIGHT):
      best = jnp.maximum(best, jnp.where(ok, _shift(rec, dy, dx, 0.0), 0.0))
    return jnp.minimum(best, distance)
  rec = _fixpoint(update, seed)
  return (distance >= min_radius) & (rec <= seed + _PEAK_TOLERANCE)


def flood_from_peaks(filled: jax.Array, distance: jax.Array, seeds: jax.Array
                     ) -> jax.Array:
  """int [h, w]: each pixel's seed (a flat pixel index; h * w where its region has
  none), the one nearest by geodesic length inside the region minus the seed's
  own distance to the edge: two touching discs part where they touch."""
  h, w = filled.shape
  n = h * w
  same = [filled == _shift(filled, dy, dx, -1) for dy, dx in _EIGHT]

  def update(carry):
    value, label = carry
    for ok, (dy, dx), step in zip(same, _EIGHT, _STEPS):
      offered = jnp.where(ok, _shift(value, dy, dx, jnp.inf) + step, jnp.inf)
      offered_label = _shift(label, dy, dx, n)
      better = (offered < value) | ((offered == value) & (offered_label < label))
      value = jnp.where(better, offered, value)
      label = jnp.where(better, offered_label, label)
    return value, label
  start = (jnp.where(seeds < n, -distance, jnp.inf), seeds)
  return _fixpoint(update, start)[1]


def shape_split(regions: jax.Array, *, min_radius: float, waist: float, max_area: int,
                max_regions: int) -> tuple[jax.Array, jax.Array]:
  """Cut regions made of thick parts joined by narrow waists: (regions [h, w], with
  each new part in a new slot after the last region; cut_from [R], the region
  each slot was cut from, itself for the others).

  Per region of at most `max_area` pixels that does not touch the image's
  border (the floor's pieces do; holes filled, `hole_hosts`): the
  distance transform's standing peaks (`peaks`) seed a flood (`flood_from_peaks`);
  two adjacent parts join again where the pixels on their cut are farther from
  the edge than `waist` times the lower part's peak, so a cut is kept only
  across a waist that is narrow against both parts. Parts beyond the R slots
  stay with their region. A hole keeps its own label.
  """
  h, w = regions.shape
  n, r = h * w, max_regions
  filled = hole_hosts(regions, max_area, r)
  area = jnp.zeros(r, jnp.int32).at[filled].add(1)
  candidate = ((area <= max_area) & ~_on_edge(filled, r))[filled]
  distance = distance_to_edge(filled, candidate)
  tops = candidate & peaks(filled, distance, min_radius=min_radius, waist=waist)
  top_root = components(jnp.where(tops, filled, -1)).reshape(h, w)
  part = flood_from_peaks(filled, distance, jnp.where(tops, top_root, n))
  labelled = part < n
  flat_distance = distance.reshape(-1)
  height = flat_distance[jnp.minimum(part, n - 1)]  # each part's peak

  links = []
  for dy, dx in _EIGHT:
    other, other_height = _shift(part, dy, dx, n), _shift(height, dy, dx, 0.0)
    low = jnp.minimum(distance, _shift(distance, dy, dx, 0.0))
    wide = low > waist * jnp.minimum(height, other_height) + _PEAK_TOLERANCE
    links.append(((dy, dx), labelled & (other < n) & (
        (other == part) | ((filled == _shift(filled, dy, dx, -1)) & wide))))
  root = connected_roots((h, w), links).reshape(h, w)

  # The part with the first root keeps the region's slot; the others take new ones.
  first = jnp.full(r, n, jnp.int32).at[jnp.where(labelled, filled, r)].min(
      root, mode="drop")
  moved = labelled & (regions == filled) & (root != first[filled])
  used = jnp.zeros(n, bool).at[jnp.where(moved, root, n)].set(True, mode="drop")
  slot = jnp.max(regions) + 1 + jnp.cumsum(used) - 1
  fits = used & (slot < r)
  out = jnp.where(moved & fits.reshape(-1)[root], slot[root], regions)
  cut_from = jnp.arange(r).at[jnp.where(fits, slot, r)].set(filled.reshape(-1), mode="drop")
  return out.astype(jnp.int32), cut_from


def _distances_to(one: jax.Array, means: jax.Array, metric: str) -> jax.Array:
  """[R]: distances of the mean `one` [c] to every mean [R, c] (the reference's forms)."""
  if metric == "cosine":
    norms = jnp.linalg.norm(means, axis=1) * jnp.linalg.norm(one)
    dots = jnp.dot(means, one, precision=_HIGHEST)
    return 1.0 - dots / jnp.where(norms > 0, norms, 1.0)
  return jnp.linalg.norm(means - one, axis=1)


def merge(regions: jax.Array, count: jax.Array, features: jax.Array | Sequence[jax.Array],
          target: jax.Array, threshold: jax.Array, *, max_regions: int, cap: int,
          metric: str, cut_from: jax.Array | None = None,
          border_factor: jax.Array | float = 1.0) -> jax.Array:
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
    cut_from: int [R], the region each slot was cut from (`shape_split`): parts of
      one region stand `APART` further from each other, so that no threshold
      merges them back; they merge only to reach `target` or `cap`.
    border_factor: the distance of a region that touches the image's border (the
      floor's pieces) to one that does not (an object) is multiplied by this
      (a region touches the border when either of its merged parts did); 1: no
      change (multiplying by 1.0 is exact). Grey objects lie nearer the floor's
      colour than the floor's own shading spreads. A program input, so every
      factor shares one compile.
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

  adjacent = _adjacency(regions, r)
  slots = jnp.arange(r)
  # Pairs cut from one region, () without a split: the loop then carries nothing more.
  apart = () if cut_from is None else (
      (cut_from[:, None] == cut_from[None, :]) & (slots[:, None] != slots[None, :]),)
  dist = jax.lax.map(lambda one: distances_to(one, means), means)
  border_factor = jnp.asarray(border_factor, jnp.float32)
  edge = _on_edge(regions, r)  # which regions touch the border
  dist = dist * jnp.where(edge[:, None] != edge[None, :], border_factor, 1.0)
  if apart:
    dist = dist + jnp.where(apart[0], APART, 0.0)
  dist = jnp.where(adjacent, dist, jnp.inf)

  def body(carry):
    dist, adjacent, apart, edge, means, area, alive, parent, count, _ = carry
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
    drow = distances_to(merged, new_means)
    new_edge = edge.at[i].set(edge[i] | edge[j])
    drow = drow * jnp.where(new_edge != new_edge[i], border_factor, 1.0)
    new_apart = apart
    if apart:
      apart_row = (apart[0][i] | apart[0][j]) & (slots != i)
      new_apart = (apart[0].at[i].set(apart_row).at[:, i].set(apart_row),)
      drow = drow + jnp.where(apart_row, APART, 0.0)
    drow = jnp.where(row & new_alive, drow, jnp.inf)
    new_dist = dist.at[i].set(drow).at[:, i].set(drow)
    new_dist = new_dist.at[j].set(jnp.inf).at[:, j].set(jnp.inf)
    new_parent = jnp.where(parent == j, i, parent)
    keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(stop, o, n), old, new)
    return (keep(dist, new_dist), keep(adjacent, new_adjacent), keep(apart, new_apart),
            keep(edge, new_edge), keep(means, new_means),
            keep(area, new_area), keep(alive, new_alive), keep(parent, new_parent),
            keep(count, count - 1), stop)

  alive = slots < count
  carry = (dist, adjacent, apart, edge, means, area, alive, slots, count,
           jnp.bool_(False))
  *_, alive, parent, _, _ = jax.lax.while_loop(lambda c: ~c[-1], body, carry)
  new_number = jnp.cumsum(alive) - 1
  return new_number[parent][regions].astype(jnp.int32)


def postprocess(labels: jax.Array, features: jax.Array | Sequence[jax.Array],
                target: jax.Array, threshold: jax.Array, *, num_labels: int,
                modal_size: int, split: bool, min_area: int, max_regions: int, cap: int,
                metric: str, shape_split_args: dict[str, float] | None = None,
                border_factor: jax.Array | float = 1.0, refine_steps: int = 0
                ) -> tuple[jax.Array, jax.Array]:
  """One image: cluster labels [h, w] (in 0..num_labels-1) and the features
  [h, w, c] they came from -> (region labels [h, w] in 0..cap-1, the number of
  regions of at least `min_area` pixels: more than `max_regions` means that
  the smallest of them were absorbed too).

  `target` and `threshold` are the merge's stopping rule (see `merge`): a target K
  with an infinite threshold merges to K; a threshold with target 0 predicts K;
  target = `cap` with an infinite threshold only brings the regions down to `cap`.
  `shape_split_args` (min_radius and max_area in pixels, waist a ratio; see
  `shape_split`): cut the regions at narrow waists before the merge; None: no cut.
  `refine_steps`: rounds of `refine` after the specks are absorbed (0: none).
  `border_factor`: see `merge`.
  """
  labels = modal_filter(labels.astype(jnp.int32), num_labels, modal_size)
  root = root_map(labels, num_labels, split)
  regions, count = compact(labels, root, num_labels, min_area, max_regions)
  if refine_steps:
    # The hybrid's sources are (tap, colour): the pixels' colour draws the boundaries.
    colour = features[-1] if isinstance(features, (tuple, list)) else features
    regions = refine(regions, colour, steps=refine_steps, max_regions=max_regions,
                     metric=metric)
  cut_from = None
  if shape_split_args is not None:
    regions, cut_from = shape_split(regions, max_regions=max_regions, **shape_split_args)
  regions = merge(regions, jnp.max(regions) + 1, features, target, threshold,
                  max_regions=max_regions, cap=cap, metric=metric, cut_from=cut_from,
                  border_factor=border_factor)
  return regions, count
