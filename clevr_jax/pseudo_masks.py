"""Pseudo-instance masks for the object-aware objectives: a raw-pixel segmenter
run once per training image (no labels), cached as one `.npz` per split.

The interface is a plain function on host arrays,
  segmenter(images: float [B, H, W, 3] in [0, 1]) -> int32 [B, H, W],
so any segmenter can feed the objectives. `stand_in_segmenter` is a simple one
(K-Means on Lab colour, then connected components, small ones absorbed into
their nearest kept neighbour in one pass); the evaluation's best no-oracle
raw-pixel segmenter (issue 9) is meant to replace it through `make_segmenter`.

Host-side NumPy / SciPy; imports neither TensorFlow nor `clevr_jax.data`:
the caller hands in an iterator of host batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import json
import os

import ml_collections
import numpy as np
from scipy import ndimage
from scipy import sparse
from scipy.cluster import vq

Segmenter = Callable[[np.ndarray], np.ndarray]

# sRGB (D65) -> XYZ, and the D65 white point: the CIE conversion behind Lab.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """sRGB in [0, 1] [..., 3] -> CIE Lab [..., 3] (L in [0, 100]), float64."""
  rgb = np.asarray(rgb, np.float64)
  linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055)**2.4)
  xyz = linear @ _RGB_TO_XYZ.T / _WHITE_D65
  delta = 6 / 29
  f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4 / 29)
  return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                   200 * (f[..., 1] - f[..., 2])], axis=-1)


def absorb_small_regions(regions: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """Relabels an [H, W] region map: kept regions become 0..n-1 (in the order of
  `keep`'s True entries), every other pixel takes the label of its nearest
  kept pixel, in one pass (a Euclidean distance transform with indices).

  Args:
    regions: int [H, W] region ids in [0, R).
    keep: bool [R]; at least one True.
  """
  new_ids = np.cumsum(keep) - 1
  kept_pixels = keep[regions]
  _, (iy, ix) = ndimage.distance_transform_edt(~kept_pixels, return_indices=True)
  return new_ids[regions[iy, ix]].astype(np.int32)


def merge_similar_neighbours(regions: np.ndarray, features: np.ndarray,
                             threshold: float) -> np.ndarray:
  """Merges 4-adjacent regions whose mean features differ by less than
  `threshold`, all at once (connected components of the graph of close
  neighbours; chains merge too). Returns new region ids [H, W] in [0, R')."""
  count = int(regions.max()) + 1
  flat = regions.ravel()
  sums = np.stack([np.bincount(flat, features[..., i].ravel(), count)
                   for i in range(features.shape[-1])], -1)
  means = sums / np.maximum(np.bincount(flat, minlength=count), 1)[:, None]
  pairs = np.concatenate([
      np.stack([regions[:, :-1].ravel(), regions[:, 1:].ravel()], -1),
      np.stack([regions[:-1].ravel(), regions[1:].ravel()], -1)])
  pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)
  close = np.linalg.norm(means[pairs[:, 0]] - means[pairs[:, 1]], axis=-1) < threshold
  pairs = pairs[close]
  graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                            shape=(count, count))
  _, merged = sparse.csgraph.connected_components(graph, directed=False)
  return merged[regions]


def segment_one(image: np.ndarray, *, num_clusters: int, min_area: int, max_labels: int,
                iters: int, seed: int, merge_threshold: float = 0.0) -> np.ndarray:
  """Stand-in raw-pixel segmentation of one image [H, W, 3] -> int32 [H, W].

  K-Means on Lab colour; each colour cluster split into 4-connected
  components; neighbours closer than `merge_threshold` (Lab units) in mean
  colour merged (0: none); regions under `min_area` pixels or beyond the
  `max_labels` largest absorbed into their nearest kept region. Labels are
  0..n-1 with n <= max_labels, largest region first.
  """
  h, w, _ = image.shape
  lab = rgb_to_lab(image).reshape(-1, 3)
  k = min(num_clusters, len(np.unique(lab.round(3), axis=0)))
  _, colour = vq.kmeans2(lab, k, iter=iters, minit="++",
                          seed=np.random.default_rng(seed))  # `rng=` only from SciPy 1.15
  colour = colour.reshape(h, w)
  regions = np.zeros((h, w), np.int64)
  offset = 0
  for c in range(k):  # split each colour cluster into 4-connected components
    components, count = ndimage.label(colour == c)
    regions = np.where(components > 0, components - 1 + offset, regions)
    offset += count
  if merge_threshold > 0:
    regions = merge_similar_neighbours(regions, lab.reshape(h, w, 3), merge_threshold)
    offset = int(regions.max()) + 1
  areas = np.bincount(regions.ravel(), minlength=offset)
  order = np.argsort(-areas, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(offset)
  keep = (areas >= min_area) & (rank < max_labels)
  keep[order[0]] = True  # the largest region always stays
  # Number kept regions by area: relabel so that id order follows rank.
  relabelled = absorb_small_regions(rank[regions], keep[order])
  return relabelled


def stand_in_segmenter(images: np.ndarray, *, num_clusters: int = 8, min_area: int = 12,
                       max_labels: int = 16, iters: int = 20, seed: int = 0,
                       merge_threshold: float = 0.0) -> np.ndarray:
  """[B, H, W, 3] float in [0, 1] -> int32 [B, H, W] pseudo-instance labels."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"pseudo-masks need RGB images [B, H, W, 3]; got {images.shape}")
  return np.stack([segment_one(im, num_clusters=num_clusters, min_area=min_area,
                               max_labels=max_labels, iters=iters, seed=seed,
                               merge_threshold=merge_threshold)
                   for im in images]).astype(np.int32)


def make_segmenter(config: ml_collections.ConfigDict) -> Segmenter:
  """The segmenter `config.objectives.pseudo_masks` describes."""
  pm = config.objectives.pseudo_masks
  if not 1 <= pm.max_labels <= 255:
    raise ValueError(f"config.objectives.pseudo_masks.max_labels={pm.max_labels} must be in 1..255")

  def segment(images: np.ndarray) -> np.ndarray:
    return stand_in_segmenter(images, num_clusters=int(pm.num_clusters),
                              min_area=int(pm.min_area), max_labels=int(pm.max_labels),
                              iters=int(pm.kmeans_iters), seed=int(pm.seed),
                              merge_threshold=float(pm.merge_threshold))
  return segment


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """What the cached masks depend on: the segmenter's settings and the data."""
  data = config.data
  settings = config.objectives.pseudo_masks.to_dict()
  settings.pop("cache_dir")  # where the masks live does not change them
  return json.dumps({"pseudo_masks": settings,
                     "dataset": data.dataset, "real_config": data.real_config,
                     "synthetic": data.synthetic.to_dict(),
                     "size": [data.image_height, data.image_width]}, sort_keys=True)


def cache_path(config: ml_collections.ConfigDict, workdir: str, split: str = "train") -> str:
  directory = config.objectives.pseudo_masks.cache_dir or os.path.join(workdir, "pseudo_masks")
  return os.path.join(os.path.expanduser(directory), f"{split}.npz")


class PseudoMaskStore:
  """Pseudo-instance labels of a split, looked up by example index."""

  def __init__(self, index: np.ndarray, labels: np.ndarray):
    order = np.argsort(index, kind="stable")
    self.index = np.asarray(index, np.int64)[order]
    self.labels = np.asarray(labels)[order]

  def __len__(self) -> int:
    return len(self.index)

  def lookup(self, index: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Labels [..., H, W] int32 of the examples `index` [...]; zeros where
    `valid` is False (padding). An unknown valid index is an error."""
    index = np.asarray(index, np.int64)
    valid = np.ones(index.shape, bool) if valid is None else np.asarray(valid, bool)
    pos = np.clip(np.searchsorted(self.index, index), 0, len(self.index) - 1)
    found = self.index[pos] == index
    if np.any(valid & ~found):
      missing = index[valid & ~found][:5].tolist()
      raise ValueError(f"no pseudo-masks cached for examples {missing}: delete the cache "
                       "file to recompute it")
    out = self.labels[pos].astype(np.int32)
    return np.where((valid & found)[..., None, None], out, 0)


def compute(batches: Iterable[dict[str, np.ndarray]], segmenter: Segmenter
            ) -> PseudoMaskStore:
  """Runs `segmenter` on every valid example of host batches ('image', 'valid',
  'index'; any leading dims, e.g. [devices, per_device, ...])."""
  indices, labels = [], []
  for batch in batches:
    image = np.asarray(batch["image"])
    image = image.reshape((-1,) + image.shape[-3:])
    valid = np.asarray(batch["valid"], bool).reshape(-1)
    index = np.asarray(batch["index"]).reshape(-1)
    if valid.any():
      labels.append(segmenter(image[valid]).astype(np.uint8))
      indices.append(index[valid])
  if not labels:
    raise ValueError("no valid examples to compute pseudo-masks for")
  return PseudoMaskStore(np.concatenate(indices), np.concatenate(labels))


def load_or_compute(path: str, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
                    segmenter: Segmenter, key: str) -> PseudoMaskStore:
  """The cached store at `path` if it was made with the same `key` (see
  `fingerprint`); otherwise computes it from `batches()` and writes it
  (atomically: a killed run leaves no half-written cache)."""
  if os.path.exists(path):
    with np.load(path) as stored:
      if str(stored["fingerprint"]) == key:
        return PseudoMaskStore(stored["index"], stored["labels"])
  store = compute(batches(), segmenter)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, index=store.index, labels=store.labels, fingerprint=np.array(key))
  os.replace(tmp, path)
  return store


def add_to_batch(batch: dict[str, np.ndarray], store: PseudoMaskStore) -> dict[str, np.ndarray]:
  """The host batch with 'pseudo_labels' (int32, the layout of its 'index' + [H, W])."""
  return batch | {"pseudo_labels": store.lookup(batch["index"], batch.get("valid"))}
