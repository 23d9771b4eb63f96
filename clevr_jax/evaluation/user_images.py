"""Masks for the user's own images (--mode=segment), through a configured segmenter.

Every image Pillow can read is segmented (PNG, JPEG, .jpg/.JPG alike, in
folders too); those that cannot be read are skipped, and listed in one error
at the end, after the rest are written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clevr_jax import models
from clevr_jax import plots
from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.segmentation import kmeans
from clevr_jax.segmentation import segmenters as segmenters_lib
from clevr_jax.training import train_step


_MAX_LABELS = 255  # labels are written as 8-bit PNGs


def _image_extensions() -> set[str]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return {ext.lower() for ext in Image.registered_extensions()}


def image_files(paths: Iterable[str]) -> list[str]:
  """Files named, and the image files of folders named (any extension Pillow reads).

  A folder's links that lead nowhere (dangling, or a loop) are kept: reading
  them fails, and they are listed with the other files that cannot be read.
  """
  paths = list(paths)
  extensions = _image_extensions()
  files = []
  for path in paths:
    if os.path.isdir(path):
      names = (f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in extensions)
      files += sorted(os.path.join(path, f) for f in names
                      if os.path.isfile(os.path.join(path, f))
                      or not os.path.exists(os.path.join(path, f)))
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"--images: no file or folder at {path!r}")
  if not files:
    raise FileNotFoundError(f"--images: no image files in {paths}")
  return files


def output_stems(files: list[str]) -> dict[str, str]:
  """Each input's output name (without `_labels.png`), unique over the inputs.

  The file's stem; where inputs share one (`scene.png` and `scene.jpg`, or
  `a/x.png` and `b/x.png`), their path below the folder common to all inputs,
  extension included, with '/' and '.' as '_' (`scene_png`, `a_x_png`).
  """
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
  names = {}
  for file, stem in zip(files, stems):
    if stems.count(stem) > 1:
      relative = os.path.relpath(os.path.abspath(file), common)
      stem = relative.replace(os.sep, "_").replace(".", "_")
    names[file] = stem
  taken = set()
  for file in files:  # a stem like 'scene_png' that was already a file's own name
    while names[file] in taken:
      names[file] += "_"
    taken.add(names[file])
  return names


# Pillow's modes of more than 8 bits per channel, and their full scale: 16-bit
# PNGs open as I;16 (or I), and convert("RGB") would clip them at 255.
_HIGH_DEPTH = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535,
               "F": 1.0}


def load_rgb(path: str) -> np.ndarray:
  """Any image Pillow reads (RGB, RGBA, gray, palette, 16-bit) -> float32 RGB [H, W, 3] in [0, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    if image.mode in _HIGH_DEPTH:
      gray = np.asarray(image, np.float32) / _HIGH_DEPTH[image.mode]
      return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"), np.float32) / 255.0


def segment_images(config: ml_collections.ConfigDict, workdir: str, paths: Iterable[str], *,
                   tap: str, num_clusters: int, output_dir: str) -> list[str]:
  """Segments one tap of each image with the segmenter `config.eval.user_segmenter`
  (by default one that predicts K); writes a label PNG and a colour PNG per image.

  `num_clusters` (0: the segmenter's own) is a K-predicting segmenter's K-Means
  clusters (K0, merged back as it decides), or K for one that takes K.

  Images keep their size: they are padded (edge pixels repeated) up to the
  network's multiple of 2**depth, never resized, and the labels cropped back.

  Raises:
    ValueError: after writing every readable image, naming those that were not.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  valid_taps = models.config_tap_names(config)
  if tap not in valid_taps:
    raise ValueError(f"--tap={tap!r} is not one of {list(valid_taps)}")
  if not 0 <= num_clusters <= _MAX_LABELS:
    raise ValueError(f"--num_clusters={num_clusters} must be in 1..{_MAX_LABELS} "
                     "(or 0: the segmenter's own)")
  name = config.eval.user_segmenter
  segmenter = segmenters_lib.from_config(name, config.eval.segmenters[name])
  if num_clusters:
    segmenter = dataclasses.replace(segmenter, fixed_k=num_clusters)
  if segmenter.k == "oracle":  # no truth here: --num_clusters is K
    segmenter = dataclasses.replace(segmenter, k="fixed")
  if segmenter.predicts_k and num_clusters:
    segmenter = dataclasses.replace(segmenter, num_clusters=num_clusters)
  k = segmenters_lib.cluster_k(segmenter, jnp.zeros(1, jnp.int32))
  target, threshold = segmenters_lib.merge_rule(segmenter, segmenters_lib.target_k(
      segmenter, jnp.zeros(1, jnp.int32)), tap, _MAX_LABELS)
  files = image_files(paths)
  stems = output_stems(files)
  mesh = sharding.make_mesh()
  if tap == "input":
    state, predict = None, None  # raw pixels: no checkpoint needed
  else:
    from clevr_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
    state, model = checkpoints.restore_model(config, workdir, mesh)
    predict = train_step.make_predict_fn(model, (tap,))  # one jit: images of a size share it
  run = jax.jit(lambda f, key, w, pixels: segmenters_lib.segment(
      segmenter, config.eval.kmeans, f, k, key[None], target, threshold,
      is_pixels=tap == "input", max_regions=config.eval.max_regions, cap=_MAX_LABELS,
      point_weights=w, pixels=pixels))
  factor, _ = models.size_factor(config)
  os.makedirs(output_dir, exist_ok=True)
  palette = plots.label_colors(256)[1:]
  written, unreadable = [], []
  for path in files:
    try:
      rgb = load_rgb(path)
    # What Pillow raises on bad files, and on images past its decompression-bomb limit.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      unreadable.append(f"{path} ({type(e).__name__}: {e})")
      logging.warning("cannot read %s: %s", path, e)
      continue
    height, width = rgb.shape[:2]
    pad = ((0, -height % factor), (0, -width % factor), (0, 0))
    image = padded = np.pad(rgb, pad, mode="edge")
    if config.data.grayscale:
      image = image @ np.asarray(schema.LUMINANCE_WEIGHTS, np.float32)[:, None]
    if predict is None:
      features = jnp.asarray(image[None])
    else:
      features = predict(state, jnp.asarray(image[None]))[1][tap]
    # Each point clustered weighs the real (unpadded) image pixels it covers, so
    # the padding does not pull the clusters: a tap pixel those of its block, an
    # image pixel itself (a segmenter that reads the image clusters its pixels).
    real = np.pad(np.ones((height, width), np.float32), pad[:2])
    _, h, w, _ = features.shape if not segmenter.uses_pixels else padded[None].shape
    f = image.shape[0] // h
    weights = real.reshape(h, f, w, f).sum((1, 3)).reshape(1, h * w)
    labels, counts = run(features, jax.random.key(config.seed), jnp.asarray(weights),
                         jnp.asarray(padded[None]))
    segmenters_lib.check_region_counts(np.asarray(counts), config.eval.max_regions, path)
    labels = np.asarray(kmeans.upsample_labels(labels, image.shape[0], image.shape[1]))[0]
    labels = labels[:height, :width].astype(np.uint8)
    stem = os.path.join(output_dir, stems[path])
    Image.fromarray(labels, mode="L").save(f"{stem}_labels.png")
    Image.fromarray(palette[labels]).save(f"{stem}_masks.png")
    written.append(f"{stem}_labels.png")
    logging.info("%s (%dx%d): %d regions of tap %s (%s) -> %s_labels.png", path, height,
                 width, len(np.unique(labels)), tap, name, stem)
  if unreadable:
    raise ValueError(f"segmented {len(written)} image(s) into {output_dir}; could not read "
                     f"{len(unreadable)}: " + "; ".join(unreadable))
  return written
