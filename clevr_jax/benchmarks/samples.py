"""The benchmarks' real images: the two `clevr_with_masks` records in tests/data,
mirrored and shifted into as many distinct 240x320 images as a batch needs."""

from __future__ import annotations

import os

import numpy as np

from clevr_jax import schema

SAMPLES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data",
                           "clevr_with_masks_samples")
_SHIFTS = ((0, 0), (9, 13), (-17, 6), (23, -21))


def _load(folder: str, key: str) -> list[np.ndarray]:
  arrays = []
  for i in (0, 1):
    with np.load(os.path.join(folder, f"sample_{i}.npz")) as data:
      arrays.append(data[key])
  return arrays


def sample_images(folder: str, count: int) -> np.ndarray:
  """[count, 240, 320, 3] float32 in [0, 1]: image i is sample i % 2, mirrored when
  (i // 2) is odd, rolled by the (i // 4)-th shift."""
  base = [image.astype(np.float32) / 255 for image in _load(folder, "image")]
  out = []
  for i in range(count):
    image = base[i % 2]
    if (i // 2) % 2:
      image = image[:, ::-1]
    dy, dx = _SHIFTS[(i // 4) % len(_SHIFTS)]
    out.append(np.roll(image, (dy, dx), axis=(0, 1)))
  return np.stack(out)


def sample_num_masks(folder: str, count: int) -> np.ndarray:
  """[count] int32: the true masks (background included) of each `sample_images` image."""
  per_sample = [int((mask.reshape(schema.MAX_SLOTS, -1).max(1) > 0).sum())
                for mask in _load(folder, "mask")]
  return np.array([per_sample[i % 2] for i in range(count)], np.int32)
