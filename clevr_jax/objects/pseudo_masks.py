"""Pseudo-instance masks for the object-aware objectives: a raw-pixel segmenter
of the evaluation (no labels) run once per training image, cached as one
`.npz` per split.

The segmenter is the one `config.objectives.pseudo_masks.segmenter` names in
`config.eval.segmenters`; it must predict K (k='predict'), since training
images have no oracle. By default that is the best no-oracle raw-pixel
pipeline of the evaluation, `split_merge_predict_k` (Lab colour, K0-Means,
connected components, specks absorbed, neighbours of close colour merged), so
the masks a run trains on are exactly what its raw-pixel baseline predicts.

Self-training: from round 1 on (`pseudo_masks.round`), the masks
come from `pseudo_masks.round_segmenter`, a hybrid that splits by the image and
merges by the previous round's network's tap; each round has its own cache
file, and its fingerprint names the teacher.

Imports neither TensorFlow nor `clevr_jax.data`: the caller hands in an
iterator of host batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import json
import os
import zipfile
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clevr_jax.segmentation import kmeans
from clevr_jax.segmentation import segmenters as segmenters_lib

# images float [B, H, W, 3] in [0, 1], their indices [B] -> labels int32 [B, H, W]
Segmenter = Callable[[np.ndarray, np.ndarray], np.ndarray]


def configured_segmenter(config: ml_collections.ConfigDict) -> segmenters_lib.Segmenter:
  """The evaluation segmenter the pseudo-masks come from: `segmenter` in round 0,
  `round_segmenter` after (both checked by `validate.check_self_training`)."""
  pm = config.objectives.pseudo_masks
  name = pm.segmenter if pm.round == 0 else pm.round_segmenter
  return segmenters_lib.from_config(name, config.eval.segmenters[name])


def make_segmenter(config: ml_collections.ConfigDict,
                   tap_fn: Callable[[np.ndarray], jax.Array] | None = None) -> Segmenter:
  """The pseudo-mask segmenter of `config` as a host function (see `Segmenter`).

  The whole segmenter runs jitted on the default device with the evaluation's
  K-Means settings, per-image keys (`kmeans.image_keys`) and region slots
  (`eval.max_regions`): the same labels the raw-pixel baseline of
  `--mode=baselines` gets, capped at `max_labels` regions. From round 1 on,
  `tap_fn` (images -> the teacher network's tap `objectives.tap`) gives the
  learned features the round's hybrid merges by.
  """
  segmenter = configured_segmenter(config)
  if (config.objectives.pseudo_masks.round > 0) != (tap_fn is not None):
    raise ValueError("pseudo-masks of round >= 1 need the teacher network's tap, and "
                     "round 0's none")
  km = config.eval.kmeans
  max_labels = int(config.objectives.pseudo_masks.max_labels)
  max_regions = int(config.eval.max_regions)

  is_pixels = tap_fn is None

  @jax.jit
  def run(features, images, index):
    k = jnp.full(images.shape[:1], segmenter.num_clusters, jnp.int32)
    target, threshold = segmenters_lib.merge_rule(
        segmenter, k, "pixels" if is_pixels else config.objectives.tap, max_labels)
    labels, counts = segmenters_lib.segment(
        segmenter, km, features, k, kmeans.image_keys(config.seed, index), target, threshold,
        is_pixels=is_pixels, max_regions=max_regions, cap=max_labels, pixels=images)
    return kmeans.upsample_labels(labels, *images.shape[1:3]), counts

  def segment(images: np.ndarray, index: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"pseudo-masks need RGB images [B, H, W, 3]; got {images.shape}")
    features = images if is_pixels else tap_fn(images)
    labels, counts = run(features, images, np.asarray(index))
    segmenters_lib.check_region_counts(np.asarray(counts), max_regions, "the pseudo-masks")
    return np.asarray(labels, np.int32)

  return segment


def fingerprint(config: ml_collections.ConfigDict, teacher: str = "") -> str:
  """What the cached masks depend on: the segmenter's settings, the data and,
  from round 1 on, the teacher (`teacher`: e.g. its checkpoint's path and step)."""
  data = config.data
  settings = config.objectives.pseudo_masks.to_dict()
  settings.pop("cache_dir")  # where the masks live does not change them
  name = settings["segmenter" if settings["round"] == 0 else "round_segmenter"]
  return json.dumps({"pseudo_masks": settings, "teacher": teacher,
                     "tap": config.objectives.tap if settings["round"] else "",
                     "segmenter": config.eval.segmenters[name].to_dict(),
                     "kmeans": config.eval.kmeans.to_dict(), "seed": config.seed,
                     "dataset": data.dataset, "real_config": data.real_config,
                     "synthetic": data.synthetic.to_dict(),
                     "size": [data.image_height, data.image_width]}, sort_keys=True)


def cache_path(config: ml_collections.ConfigDict, workdir: str, split: str = "train") -> str:
  directory = config.objectives.pseudo_masks.cache_dir or os.path.join(workdir, "pseudo_masks")
  rounds = config.objectives.pseudo_masks.round
  name = f"{split}_round{rounds}.npz" if rounds else f"{split}.npz"
  return os.path.join(os.path.expanduser(directory), name)


class PseudoMaskStore:
  """Pseudo-instance labels of a split, looked up by example index."""

  def __init__(self, index: np.ndarray, labels: np.ndarray):
    order = np.argsort(index, kind="stable")
    self.index = np.asarray(index, np.int64)[order]
    self.labels = np.asarray(labels)[order]

  def __len__(self) -> int:
    return len(self.index)

  def lookup(self, index: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Labels [..., H, W] uint8 of the examples `index` [...]; zeros where
    `valid` is False (padding). An unknown valid index is an error."""
    index = np.asarray(index, np.int64)
    valid = np.ones(index.shape, bool) if valid is None else np.asarray(valid, bool)
    pos = np.clip(np.searchsorted(self.index, index), 0, len(self.index) - 1)
    found = self.index[pos] == index
    if np.any(valid & ~found):
      missing = index[valid & ~found][:5].tolist()
      raise ValueError(f"no pseudo-masks cached for examples {missing}: delete the cache "
                       "file to recompute it")
    out = self.labels[pos].astype(np.uint8)
    return np.where((valid & found)[..., None, None], out, np.uint8(0))


def compute(batches: Iterable[dict[str, np.ndarray]], segmenter: Segmenter,
            progress: Callable[[int], None] | None = None) -> PseudoMaskStore:
  """Runs `segmenter` on every valid example of host batches ('image' float in
  [0, 1], 'valid', 'index'; any leading dims); `progress(n)` after each batch."""
  indices, labels = [], []
  for batch in batches:
    image = np.asarray(batch["image"])
    image = image.reshape((-1,) + image.shape[-3:])
    valid = np.asarray(batch["valid"], bool).reshape(-1)
    index = np.asarray(batch["index"]).reshape(-1)
    if valid.any():
      labels.append(segmenter(image[valid], index[valid]).astype(np.uint8))
      indices.append(index[valid])
    if progress is not None:
      progress(int(valid.sum()))
  if not labels:
    raise ValueError("no valid examples to compute pseudo-masks for")
  return PseudoMaskStore(np.concatenate(indices), np.concatenate(labels))


def load_or_compute(path: str, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
                    segmenter: Segmenter, key: str,
                    progress: Callable[[int], None] | None = None) -> PseudoMaskStore:
  """The cached store at `path` if it was made with the same `key` (see
  `fingerprint`); otherwise computes it from `batches()` and writes it
  (atomically: a killed run leaves no half-written cache)."""
  if os.path.exists(path):
    try:
      with np.load(path) as stored:
        if str(stored["fingerprint"]) == key:
          return PseudoMaskStore(stored["index"], stored["labels"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      # Cut short or damaged (a full disk, a bad copy): the masks can simply be made again.
      logging.warning("the pseudo-mask cache %s cannot be read (%s: %s): computing it again",
                      path, type(e).__name__, e)
  store = compute(batches(), segmenter, progress)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, index=store.index, labels=store.labels, fingerprint=np.array(key))
  os.replace(tmp, path)
  return store
