"""Tests of clevr_jax.pseudo_masks: the stand-in raw-pixel segmenter and the cache."""

import os

import numpy as np
import pytest

from clevr_jax import defaults
from clevr_jax import pseudo_masks


def test_rgb_to_lab_known_colours():
  np.testing.assert_allclose(pseudo_masks.rgb_to_lab(np.ones(3)), [100, 0, 0], atol=1e-3)
  np.testing.assert_allclose(pseudo_masks.rgb_to_lab(np.zeros(3)), [0, 0, 0], atol=1e-9)
  # sRGB red's CIE Lab (D65), as published colour tables give it.
  np.testing.assert_allclose(pseudo_masks.rgb_to_lab(np.array([1.0, 0, 0])),
                             [53.24, 80.09, 67.20], atol=0.02)


def _scene(noise=0.0, seed=0):
  """Gray background, two red squares apart, one blue square, a green speck."""
  image = np.full((32, 40, 3), 0.5)
  image[3:11, 3:11] = (0.8, 0.1, 0.1)
  image[20:28, 25:33] = (0.8, 0.1, 0.1)
  image[3:11, 25:33] = (0.1, 0.2, 0.9)
  image[18, 8] = (0.1, 0.8, 0.1)
  image += np.random.default_rng(seed).normal(0, noise, image.shape)
  return np.clip(image, 0, 1)


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_stand_in_finds_same_coloured_objects_apart_and_absorbs_specks(noise):
  labels = pseudo_masks.stand_in_segmenter(_scene(noise)[None], num_clusters=5, min_area=10,
                                           merge_threshold=8.0)[0]
  assert labels.dtype == np.int32 and labels.shape == (32, 40)
  assert len(np.unique(labels)) == 4  # background and three squares; the speck absorbed
  assert labels[18, 8] == labels[0, 0]
  inside = [labels[5, 5], labels[24, 29], labels[5, 29]]
  assert len(set(inside) | {labels[0, 0]}) == 4
  assert labels[0, 0] == 0  # the largest region comes first
  # Every square is one region.
  assert len(np.unique(labels[3:11, 3:11])) == 1


def test_max_labels_keeps_the_largest_regions():
  labels = pseudo_masks.stand_in_segmenter(_scene()[None], num_clusters=5, min_area=1,
                                           max_labels=2)[0]
  assert set(np.unique(labels)) == {0, 1}


def _batches(images, devices=2):
  """Host batches in the pipeline's [devices, per_device, ...] layout, the
  last one padded with an invalid example."""
  n = len(images)
  out = []
  for start in range(0, n, 4):
    chunk = images[start:start + 4]
    index = np.arange(start, start + len(chunk)) + 100
    valid = np.ones(4, bool)
    if len(chunk) < 4:
      pad = 4 - len(chunk)
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:])])
      index = np.concatenate([index, np.zeros(pad, int)])
      valid[-pad:] = False
    out.append({"image": chunk.reshape((devices, 2) + chunk.shape[1:]),
                "index": index.reshape(devices, 2), "valid": valid.reshape(devices, 2)})
  return out


def test_cache_is_computed_once_and_looked_up_by_index(tmp_path):
  images = np.stack([_scene(0.01, seed) for seed in range(7)])
  calls = []

  def segmenter(x):
    calls.append(len(x))
    return pseudo_masks.stand_in_segmenter(x, num_clusters=5, min_area=10, merge_threshold=8)

  path = os.path.join(tmp_path, "pm", "train.npz")
  store = pseudo_masks.load_or_compute(path, lambda: _batches(images), segmenter, "k1")
  assert sum(calls) == 7 and len(store) == 7  # the padded example is skipped
  again = pseudo_masks.load_or_compute(path, lambda: _batches(images), segmenter, "k1")
  assert sum(calls) == 7  # read from the cache
  np.testing.assert_array_equal(again.labels, store.labels)
  # Looked up in any order and layout; padding gets zeros.
  batch = {"index": np.array([[106, 100], [0, 103]]),
           "valid": np.array([[True, True], [False, True]])}
  looked = pseudo_masks.add_to_batch(batch, again)["pseudo_labels"]
  assert looked.shape == (2, 2, 32, 40) and looked.dtype == np.int32
  direct = pseudo_masks.stand_in_segmenter(images[[6, 0, 3]], num_clusters=5, min_area=10,
                                           merge_threshold=8)
  np.testing.assert_array_equal(looked[[0, 0, 1], [0, 1, 1]], direct)
  assert not looked[1, 0].any()
  with pytest.raises(ValueError, match="no pseudo-masks cached for examples \\[5\\]"):
    again.lookup(np.array([5]))
  # Other settings: computed again.
  pseudo_masks.load_or_compute(path, lambda: _batches(images), segmenter, "k2")
  assert sum(calls) == 14


def test_fingerprint_and_paths_follow_the_config(tmp_path):
  config = defaults.get_config("quick")
  key = pseudo_masks.fingerprint(config)
  config.objectives.pseudo_masks.num_clusters += 1
  assert pseudo_masks.fingerprint(config) != key
  assert pseudo_masks.cache_path(config, "/w") == "/w/pseudo_masks/train.npz"
  moved = pseudo_masks.fingerprint(config)
  config.objectives.pseudo_masks.cache_dir = str(tmp_path)
  assert pseudo_masks.fingerprint(config) == moved
  assert pseudo_masks.cache_path(config, "/w", "test") == os.path.join(tmp_path, "test.npz")
  config.objectives.pseudo_masks.max_labels = 300
  with pytest.raises(ValueError, match="max_labels"):
    pseudo_masks.make_segmenter(config)
