"""The SciPy reference of the post-processing (`regions.py`): the tests' oracle.

Nothing on the product path calls this module: the segmenters post-process on
the devices (`regions.py`). It is kept, one image at a time on the host, as
the plain statement of what the device program must compute, for the tests
and for `benchmarks/segmenter_benchmark.py` to compare against.

Pixel clusters are not objects: one cluster holds every object of a colour,
and sampling noise, shading and highlights scatter thousands of specks. The
steps here turn clusters into regions:

  modal_filter       optional majority vote in a square window (smooths specks)
  split_components   each cluster -> its 4-connected components
  absorb_small       regions under a minimum area take the label of the
                     nearest pixel of a kept region: one Euclidean distance
                     transform for all of them at once, never one region at a time
  refine             each pixel takes, of its own and its 4-neighbours' regions,
                     the one of nearest mean feature, a few rounds
  shape_split        regions of thick parts joined by a narrow waist are cut
                     between the peaks of their distance transform: shortest
                     paths on the pixel graph (SciPy's Dijkstra) for the
                     distances and the flood, grey dilation for the peaks
  merge_regions      adjacent regions merge, closest mean features first, down
                     to K regions or while the closest pair is under a threshold

Why SciPy's ndimage: connected components and the distance transform are
compiled C over the whole image, and SciPy is on every machine the project
runs on (scikit-image is not on the GPU machine). The merge works on the
region adjacency graph, which after absorbing has tens of nodes: a dense
NumPy distance matrix is both simpler and faster than a graph library there.

All functions take and return label maps [h, w] of consecutive ints 0..n-1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy import sparse
from scipy.sparse import csgraph

# 4-connectivity: diagonal neighbours are not connected.
_FOUR = ndimage.generate_binary_structure(2, 1)
# The 8 neighbours (dy, dx): a pixel at (y, x) and its neighbour at (y - dy, x - dx).
_EIGHT = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))
# The same constants as the device program's (regions.py).
APART = 1e4
_PEAK_TOLERANCE = 1e-3


def relabel(labels: np.ndarray) -> np.ndarray:
  """Labels renumbered 0..n-1 in order of first appearance value (np.unique order)."""
  _, inverse = np.unique(labels, return_inverse=True)
  return inverse.reshape(labels.shape).astype(np.int32)


def modal_filter(labels: np.ndarray, size: int) -> np.ndarray:
  """Each pixel takes the most frequent label in its size x size window (edges
  repeated); a tie goes to the smaller label. Integer counts, so ties are exact."""
  if size <= 1:
    return labels
  n = int(labels.max()) + 1
  window = np.ones((size, size), np.int32)
  counts = np.stack([ndimage.correlate((labels == k).astype(np.int32), window,
                                       mode="nearest") for k in range(n)])
  return counts.argmax(axis=0).astype(np.int32)


def split_components(labels: np.ndarray) -> np.ndarray:
  """Each cluster split into its 4-connected components, numbered 0..n-1."""
  out = np.zeros(labels.shape, np.int32)
  offset = 0
  for k in np.unique(labels):
    components, count = ndimage.label(labels == k, structure=_FOUR)
    mask = components > 0
    out[mask] = components[mask] - 1 + offset
    offset += count
  return out


def absorb_small(regions: np.ndarray, min_area: int) -> np.ndarray:
  """Regions under `min_area` pixels take the label of the nearest kept pixel.

  One distance transform gives every pixel of every small region the index
  of its nearest pixel in a region that is kept. If no region is that large,
  the largest one is kept.
  """
  if min_area <= 1:
    return regions
  areas = np.bincount(regions.ravel())
  keep = areas >= min_area
  if not keep.any():
    keep[areas.argmax()] = True
  small = ~keep[regions]
  if not small.any():
    return regions
  rows, cols = ndimage.distance_transform_edt(small, return_distances=False,
                                              return_indices=True)
  return relabel(regions[rows, cols])


def _neighbour_pairs(shape: tuple[int, int]):
  """For each of the 8 directions: (step length, the slices of the pixels and of
  their neighbours in that direction, both inside the image)."""
  h, w = shape
  for dy, dx in _EIGHT:
    here = (slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
    there = (slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0)))
    yield math.hypot(dy, dx), here, there


def hole_hosts(regions: np.ndarray, max_area: int) -> np.ndarray:
  """Each pixel's region, or for a region enclosed by a single other region of at
  most `max_area` pixels, that region's (holes filled; a hole's hole too)."""
  n = int(regions.max()) + 1
  adjacent = region_adjacency(regions, n)
  on_edge = set(np.concatenate([regions[0], regions[-1], regions[:, 0],
                                regions[:, -1]]).tolist())
  area = np.bincount(regions.ravel(), minlength=n)
  host = np.arange(n)
  for k in range(n):
    neighbours = np.flatnonzero(adjacent[k])
    if len(neighbours) == 1 and k not in on_edge and area[neighbours[0]] <= max_area:
      host[k] = neighbours[0]
  for _ in range(3):
    host = host[host]
  return host[regions]


def _region_graph(filled: np.ndarray, candidate: np.ndarray):
  """(rows, cols, weights) of the 8-neighbour edges between pixels of one region."""
  index = np.arange(filled.size).reshape(filled.shape)
  rows, cols, weights = [], [], []
  for step, here, there in _neighbour_pairs(filled.shape):
    ok = (filled[here] == filled[there]) & candidate[here]
    rows.append(index[here][ok])
    cols.append(index[there][ok])
    weights.append(np.full(int(ok.sum()), step))
  return rows, cols, weights


def _shortest(rows, cols, weights, nodes: int, sources, **kwargs):
  graph = sparse.csr_matrix((np.concatenate(weights), (np.concatenate(rows),
                                                       np.concatenate(cols))),
                            shape=(nodes, nodes))
  return csgraph.dijkstra(graph, directed=True, indices=sources, **kwargs)


def distance_to_edge(filled: np.ndarray, candidate: np.ndarray) -> np.ndarray:
  """Each candidate pixel's shortest 8-connected path length (steps 1 and sqrt 2)
  to a pixel outside its region or outside the image; 0 elsewhere."""
  h, w = filled.shape
  n = h * w
  # A virtual source, one step (the shortest out) from each pixel at the edge.
  exit_step = np.full(filled.shape, np.inf)
  padded = np.pad(filled, 1, constant_values=-1)
  for dy, dx in _EIGHT:
    neighbour = padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    exit_step = np.where(neighbour != filled, np.minimum(exit_step, math.hypot(dy, dx)),
                         exit_step)
  rows, cols, weights = _region_graph(filled, candidate)
  leaving = candidate & np.isfinite(exit_step)
  rows.append(np.full(int(leaving.sum()), n))
  cols.append(np.flatnonzero(leaving))
  weights.append(exit_step[leaving])
  dist = _shortest(rows, cols, weights, n + 1, n)[:n].reshape(h, w)
  return np.where(candidate, dist, 0.0)


def peaks(filled: np.ndarray, distance: np.ndarray, candidate: np.ndarray, *,
          min_radius: float, waist: float) -> np.ndarray:
  """Tops of the distance transform's peaks that stand on their own (`regions.peaks`):
  reconstruction by dilation of waist * distance under the distance, region by
  region (3x3 grey dilation until nothing changes)."""
  seed = waist * distance
  rebuilt = np.zeros_like(distance)
  for label in np.unique(filled[candidate]):
    inside = filled == label
    rec = np.where(inside, seed, 0.0)
    while True:
      grown = np.where(inside, np.minimum(ndimage.grey_dilation(
          rec, size=(3, 3), mode="constant", cval=0.0), distance), 0.0)
      grown = np.maximum(grown, rec)
      if np.array_equal(grown, rec):
        break
      rec = grown
    rebuilt[inside] = rec[inside]
  return candidate & (distance >= min_radius) & (rebuilt <= seed + _PEAK_TOLERANCE)


def shape_split(regions: np.ndarray, *, min_radius: float, waist: float, max_area: int,
                max_regions: int) -> tuple[np.ndarray, np.ndarray]:
  """`regions.shape_split`: (regions with each new part in a new slot after the
  last region, cut_from [max_regions]: the region each slot was cut from)."""
  h, w = regions.shape
  n = h * w
  count = int(regions.max()) + 1
  filled = hole_hosts(regions, max_area)
  area = np.bincount(filled.ravel(), minlength=count)
  on_edge = np.zeros(count, bool)
  on_edge[np.concatenate([filled[0], filled[-1], filled[:, 0], filled[:, -1]])] = True
  candidate = ((area <= max_area) & ~on_edge)[filled]
  distance = distance_to_edge(filled, candidate)
  tops = peaks(filled, distance, candidate, min_radius=min_radius, waist=waist)
  # Seeds: each 4-connected set of tops in one region, named by its first pixel.
  seed_of = np.full(n, -1)
  roots = []
  for label in np.unique(filled[tops]):
    components, number = ndimage.label(tops & (filled == label), structure=_FOUR)
    for c in range(1, number + 1):
      pixels = np.flatnonzero(components == c)
      seed_of[pixels] = len(roots)
      roots.append(pixels.min())
  part = np.full(n, n)
  if roots:
    # The flood: one virtual node per seed, joined to its pixels at a length that
    # makes a path's total its geodesic length minus the seed's own distance.
    rows, cols, weights = _region_graph(filled, candidate)
    offset = float(distance.max()) + 1.0
    seeded = np.flatnonzero(seed_of >= 0)
    rows.append(n + seed_of[seeded])
    cols.append(seeded)
    weights.append(offset - distance.reshape(-1)[seeded])
    dist, _, source = _shortest(rows, cols, weights, n + len(roots),
                                n + np.arange(len(roots)), min_only=True,
                                return_predecessors=True)
    reached = np.isfinite(dist[:n])
    part[reached] = np.asarray(roots)[source[:n][reached] - n]
  part = part.reshape(h, w)
  labelled = part < n
  height = distance.reshape(-1)[np.minimum(part, n - 1)]
  # Parts join again across a cut that is not narrow against both parts' peaks.
  rows, cols = [np.arange(n)], [np.arange(n)]
  for _, here, there in _neighbour_pairs((h, w)):
    low = np.minimum(distance[here], distance[there])
    wide = low > waist * np.minimum(height[here], height[there]) + _PEAK_TOLERANCE
    ok = (labelled[here] & labelled[there] & (filled[here] == filled[there])
          & (part[here] != part[there]) & wide)
    rows.append(part[here][ok])
    cols.append(part[there][ok])
  graph = sparse.coo_matrix((np.ones(sum(len(r) for r in rows)),
                             (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
  _, union = csgraph.connected_components(graph, directed=False)
  group = np.where(labelled, union[np.minimum(part, n - 1)], -1)
  root = np.full((h, w), n)
  kept = {}  # per region, its part with the first pixel keeps the region's slot
  for g in np.unique(group[labelled]):
    first = int(np.flatnonzero(group == g).min())
    root[group == g] = first
    label = int(filled.reshape(-1)[first])
    kept[label] = min(kept.get(label, n), first)
  keeps = np.array([kept.get(int(f), -1) for f in filled.ravel()]).reshape(h, w)
  moved = labelled & (regions == filled) & (root != keeps)
  out = regions.copy()
  cut_from = np.arange(max_regions)
  for slot, first in enumerate(sorted(set(root[moved].tolist())), start=count):
    if slot < max_regions:
      out[moved & (root == first)] = slot
      cut_from[slot] = filled.reshape(-1)[first]
  return out.astype(np.int32), cut_from


def region_adjacency(regions: np.ndarray, num_regions: int) -> np.ndarray:
  """bool [n, n]: regions that share a horizontal or vertical pixel edge."""
  pairs = np.concatenate([
      np.stack([regions[:, :-1].ravel(), regions[:, 1:].ravel()], 1),
      np.stack([regions[:-1, :].ravel(), regions[1:, :].ravel()], 1)])
  pairs = pairs[pairs[:, 0] != pairs[:, 1]]
  adjacent = np.zeros((num_regions, num_regions), bool)
  adjacent[pairs[:, 0], pairs[:, 1]] = True
  return adjacent | adjacent.T


def _distances(means: np.ndarray, metric: str) -> np.ndarray:
  if metric == "cosine":
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    unit = means / np.where(norms > 0, norms, 1.0)
    return 1.0 - unit @ unit.T
  sq = (means**2).sum(1)
  return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * means @ means.T, 0.0))


def _distances_to(one: np.ndarray, means: np.ndarray, metric: str) -> np.ndarray:
  if metric == "cosine":
    norms = np.linalg.norm(means, axis=1) * np.linalg.norm(one)
    return 1.0 - means @ one / np.where(norms > 0, norms, 1.0)
  return np.linalg.norm(means - one, axis=1)


def refine_candidates(labels: np.ndarray, features: np.ndarray, metric: str = "euclidean"
                      ) -> tuple[np.ndarray, np.ndarray]:
  """One round of `refine`'s choice: (candidates [5, h * w], their distances [5, h * w]),
  each pixel's own region first, then the neighbours above, below, left and right
  (-1 and an infinite distance off the image), the distance of the pixel's feature to
  each candidate region's mean."""
  h, w = labels.shape
  x = features.reshape(h * w, -1).astype(np.float64)
  n = int(labels.max()) + 1
  flat = labels.ravel()
  area = np.bincount(flat, minlength=n).astype(np.float64)
  means = np.stack([np.bincount(flat, x[:, j], minlength=n) for j in range(x.shape[1])], 1)
  means /= np.maximum(area, 1.0)[:, None]
  padded = np.pad(labels, 1, constant_values=-1)
  candidates = np.stack([c.ravel() for c in (labels, padded[:-2, 1:-1], padded[2:, 1:-1],
                                              padded[1:-1, :-2], padded[1:-1, 2:])])
  distances = np.where(candidates >= 0, np.stack([
      _pair_distances(x, means[np.maximum(c, 0)], metric) for c in candidates]), np.inf)
  return candidates, distances


def refine(regions: np.ndarray, features: np.ndarray, *, steps: int,
           metric: str = "euclidean") -> np.ndarray:
  """`steps` rounds in which each pixel takes, of its own region and its
  4-neighbours' regions, the one whose mean feature (this round's) is nearest
  its own (the first of equals: its own, then the neighbours above, below, left,
  right; `refine_candidates`); then the regions left renumbered 0..n-1 in their
  old order."""
  labels = regions.copy()
  for _ in range(steps):
    candidates, distances = refine_candidates(labels, features, metric)
    best = np.argmin(distances, axis=0)
    labels = candidates[best, np.arange(labels.size)].reshape(labels.shape)
  return relabel(labels)


def _pair_distances(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
  """Row by row distances of a [N, c] to b [N, c]."""
  if metric == "cosine":
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1.0 - np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0)
  return np.linalg.norm(a - b, axis=1)


def merge_regions(regions: np.ndarray, features: np.ndarray, *, metric: str = "euclidean",
                  num_regions: int | None = None, threshold: float | None = None,
                  max_regions: int | None = None, cut_from: np.ndarray | None = None,
                  border_factor: float = 1.0) -> np.ndarray:
  """Greedy merging of adjacent regions, the closest mean features first.

  Stops when `num_regions` remain (merge to K), or when the closest adjacent
  pair is at least `threshold` apart (K is then predicted), whichever is
  given; and in any case goes on until at most `max_regions` remain. A merged
  region's mean is the area-weighted mean of the two.

  Args:
    regions: int [h, w] labels 0..n-1.
    features: float [h, w, c] the features whose region means are compared.
    metric: 'euclidean' or 'cosine' distance between region means.
    num_regions: merge down to this many regions.
    threshold: merge while the closest adjacent pair is closer than this.
    max_regions: an upper bound on the regions left (e.g. the label slots).
    cut_from: the region each region was cut from (`shape_split`): two parts of
      one region are APART further from each other.
    border_factor: the distance of a region on the image's border to one off it is
      multiplied by this (a merged region is on the border when a part was).
  """
  n = int(regions.max()) + 1
  if threshold is None and num_regions is None:
    raise ValueError("merge_regions needs num_regions or threshold")
  flat = regions.ravel()
  c = features.shape[-1]
  area = np.bincount(flat, minlength=n).astype(np.float64)
  sums = np.stack([np.bincount(flat, features.reshape(-1, c)[:, j].astype(np.float64),
                               minlength=n) for j in range(c)], 1)
  means = sums / np.maximum(area, 1.0)[:, None]
  adjacent = region_adjacency(regions, n)
  apart = np.zeros((n, n), bool)
  if cut_from is not None:
    apart = cut_from[:n, None] == cut_from[None, :n]
    np.fill_diagonal(apart, False)
  edge = np.zeros(n, bool)
  edge[np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])] = True
  scale = np.where(edge[:, None] != edge[None, :], border_factor, 1.0)
  dist = np.where(adjacent, _distances(means, metric) * scale + np.where(apart, APART, 0.0),
                  np.inf)
  np.fill_diagonal(dist, np.inf)
  alive = np.ones(n, bool)
  parent = np.arange(n)
  count = n
  while count > 1:
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    if not np.isfinite(dist[i, j]):
      break  # no adjacent pair left
    over_cap = max_regions is not None and count > max_regions
    if not over_cap:
      if threshold is not None and num_regions is None and dist[i, j] >= threshold:
        break
      if num_regions is not None and count <= num_regions:
        break
    # Merge j into i.
    means[i] = (means[i] * area[i] + means[j] * area[j]) / (area[i] + area[j])
    area[i] += area[j]
    adjacent[i] |= adjacent[j]
    adjacent[:, i] = adjacent[i]
    adjacent[i, i] = False
    alive[j] = False
    adjacent[j] = adjacent[:, j] = False
    apart[i] |= apart[j]
    apart[:, i] = apart[i]
    apart[i, i] = False
    apart[j] = apart[:, j] = False
    edge[i] |= edge[j]
    parent[parent == j] = i
    count -= 1
    scale = np.where(edge != edge[i], border_factor, 1.0)
    row = np.where(adjacent[i] & alive, _distances_to(means[i], means, metric) * scale
                   + np.where(apart[i], APART, 0.0), np.inf)
    dist[i] = dist[:, i] = row
    dist[j] = dist[:, j] = np.inf
    dist[i, i] = np.inf
  return relabel(parent[regions])


def postprocess_one(labels: np.ndarray, features: np.ndarray, *, modal_size: int, split: bool,
                    min_area: int, merge: bool, metric: str, target: int | None,
                    threshold: float | None, max_regions: int,
                    shape_split_args: dict[str, float] | None = None,
                    region_slots: int = 128, border_factor: float = 1.0,
                    refine_steps: int = 0) -> np.ndarray:
  """One image's cluster labels [h, w] -> region labels [h, w] (`regions.postprocess`).

  `min_area` in pixels; with `merge`, `threshold` (K predicted) or else `target`
  (K) stops the merge, and `max_regions` caps the regions in any case.
  `shape_split_args` (`shape_split`'s, in pixels) cuts regions at narrow waists
  into at most `region_slots` regions (the device program's R) before the merge;
  `border_factor` is the merge's (`merge_regions`); `refine_steps` rounds of
  `refine` follow the absorption.
  """
  regions = relabel(labels)
  if modal_size > 1:
    regions = modal_filter(regions, modal_size)
  if split:
    regions = split_components(regions)
  if min_area > 1:
    regions = absorb_small(regions, min_area)
  if refine_steps:
    regions = refine(regions, features, steps=refine_steps, metric=metric)
  cut_from = None
  if shape_split_args is not None:
    regions, cut_from = shape_split(regions, max_regions=region_slots, **shape_split_args)
  if merge:
    if threshold is not None:
      return merge_regions(regions, features, metric=metric, threshold=threshold,
                           max_regions=max_regions, cut_from=cut_from,
                           border_factor=border_factor)
    return merge_regions(regions, features, metric=metric, num_regions=max(int(target), 1),
                         max_regions=max_regions, cut_from=cut_from,
                           border_factor=border_factor)
  if int(regions.max()) + 1 > max_regions:
    # More regions than label slots: merge the closest until they fit.
    return merge_regions(regions, features, metric=metric, num_regions=max_regions,
                         cut_from=cut_from, border_factor=border_factor)
  return regions
