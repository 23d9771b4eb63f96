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

import numpy as np
from scipy import ndimage

# 4-connectivity: diagonal neighbours are not connected.
_FOUR = ndimage.generate_binary_structure(2, 1)


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


def merge_regions(regions: np.ndarray, features: np.ndarray, *, metric: str = "euclidean",
                  num_regions: int | None = None, threshold: float | None = None,
                  max_regions: int | None = None) -> np.ndarray:
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
  dist = np.where(adjacent, _distances(means, metric), np.inf)
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
    parent[parent == j] = i
    count -= 1
    row = np.where(adjacent[i] & alive, _distances_to(means[i], means, metric), np.inf)
    dist[i] = dist[:, i] = row
    dist[j] = dist[:, j] = np.inf
    dist[i, i] = np.inf
  return relabel(parent[regions])


def postprocess_one(labels: np.ndarray, features: np.ndarray, *, modal_size: int, split: bool,
                    min_area: int, merge: bool, metric: str, target: int | None,
                    threshold: float | None, max_regions: int) -> np.ndarray:
  """One image's cluster labels [h, w] -> region labels [h, w] (`regions.postprocess`).

  `min_area` in pixels; with `merge`, `threshold` (K predicted) or else `target`
  (K) stops the merge, and `max_regions` caps the regions in any case.
  """
  regions = relabel(labels)
  if modal_size > 1:
    regions = modal_filter(regions, modal_size)
  if split:
    regions = split_components(regions)
  if min_area > 1:
    regions = absorb_small(regions, min_area)
  if merge:
    if threshold is not None:
      return merge_regions(regions, features, metric=metric, threshold=threshold,
                           max_regions=max_regions)
    return merge_regions(regions, features, metric=metric, num_regions=max(int(target), 1),
                         max_regions=max_regions)
  if int(regions.max()) + 1 > max_regions:
    # More regions than label slots: merge the closest until they fit.
    return merge_regions(regions, features, metric=metric, num_regions=max_regions)
  return regions
