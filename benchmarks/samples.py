"""Inputs for the benchmarks (and tests) that need no dataset.

`sample_images`: the two real `clevr_with_masks` records in the repository's
tests/data, mirrored and shifted into as many distinct 240x320 images as a
batch needs. `random_stored`: a random host batch of stored fields
(clevr_jax/training/batch.py), in the form the pipeline sends it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from clevr_jax import schema
from clevr_jax.training import batch as batch_lib

SAMPLES_DIR = os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                           "clevr_with_masks_samples")
_SHIFTS = ((0, 0), (9, 13), (-17, 6), (23, -21))


def _load(folder: str, key: str) -> list[np.ndarray]:
  arrays = []
  for i in (0, 1):
    with np.load(os.path.join(folder, f"sample_{i}.npz")) as data:
      arrays.append(data[key])
  return arrays


def _variants(base: list[np.ndarray], count: int) -> np.ndarray:
  """Item i is base[i % 2], mirrored when (i // 2) is odd, rolled by the (i // 4)-th shift."""
  out = []
  for i in range(count):
    item = base[i % 2]
    if (i // 2) % 2:
      item = item[:, ::-1]
    dy, dx = _SHIFTS[(i // 4) % len(_SHIFTS)]
    out.append(np.roll(item, (dy, dx), axis=(0, 1)))
  return np.stack(out)


def sample_images(folder: str, count: int) -> np.ndarray:
  """[count, 240, 320, 3] float32 in [0, 1]: image i is sample i % 2, mirrored when
  (i // 2) is odd, rolled by the (i // 4)-th shift."""
  return _variants([image.astype(np.float32) / 255 for image in _load(folder, "image")], count)


def sample_labels(folder: str, count: int) -> np.ndarray:
  """[count, 240, 320] int32: the true instance labels (0 = background) of each
  `sample_images` image, moved alike."""
  return _variants([mask[..., 0].argmax(0).astype(np.int32) for mask in _load(folder, "mask")],
                   count)


def sample_num_masks(folder: str, count: int) -> np.ndarray:
  """[count] int32: the true masks (background included) of each `sample_images` image."""
  per_sample = [int((mask.reshape(schema.MAX_SLOTS, -1).max(1) > 0).sum())
                for mask in _load(folder, "mask")]
  return np.array([per_sample[i % 2] for i in range(count)], np.int32)


def random_stored(config: ml_collections.ConfigDict, batch_size: int,
                  names: Sequence[str] = batch_lib.STORED, seed: int = 0
                  ) -> dict[str, np.ndarray]:
  """A random host batch of the stored fields `names`, at the config's image size."""
  rng = np.random.default_rng(seed)
  h, w = config.data.image_height, config.data.image_width
  s = schema.MAX_SLOTS
  visible = rng.integers(2, s + 1, batch_size)
  arrays: dict[str, Any] = {
      "image": rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8),
      "labels": (rng.integers(0, 256, (batch_size, h, w)) % visible[:, None, None]
                 ).astype(np.uint8),
      "shape": np.where(np.arange(s) < visible[:, None],
                        rng.integers(1, 4, (batch_size, s)), 0).astype(np.uint8),
      "visibility": (np.arange(s) < visible[:, None]).astype(np.uint8),
      "valid": np.ones(batch_size, bool),
      "index": np.arange(batch_size, dtype=np.int32),
  }
  arrays["shape"][:, 0] = 0  # the background slot
  return {k: arrays[k] for k in names}
