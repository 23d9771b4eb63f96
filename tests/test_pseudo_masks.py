"""Tests of clevr_jax.objects.pseudo_masks: the no-oracle raw-pixel segmenter and the cache."""

import os

import numpy as np
import pytest

from clevr_jax import defaults
from clevr_jax import validate
from clevr_jax.objects import pseudo_masks


def _scene(noise=0.0, seed=0):
  """Gray background, two red squares apart, one blue square."""
  image = np.full((32, 48, 3), 0.5)
  image[3:11, 3:11] = (0.8, 0.1, 0.1)
  image[20:28, 25:33] = (0.8, 0.1, 0.1)
  image[3:11, 25:33] = (0.1, 0.2, 0.9)
  image += np.random.default_rng(seed).normal(0, noise, image.shape)
  return np.clip(image, 0, 1).astype(np.float32)


def _config(**segmenter):
  config = defaults.get_config("test")
  config.data.image_height, config.data.image_width = 32, 48
  for key, value in segmenter.items():
    config.eval.segmenters.split_merge_predict_k[key] = value
  return config


def test_segmenter_splits_same_coloured_objects_without_the_oracle():
  # split_merge_predict_k (the default): K0-Means on Lab, connected components,
  # merging neighbours of close colour: the two red squares are two regions.
  segment = pseudo_masks.make_segmenter(_config())
  labels = segment(_scene()[None], np.array([7]))[0]
  assert labels.dtype == np.int32 and labels.shape == (32, 48)
  corners = [labels[5, 5], labels[24, 29], labels[5, 29], labels[0, 0]]
  assert len(set(corners)) == 4
  for y, x in [(3, 3), (20, 25), (3, 25)]:
    # Every square is one region (the 3x3 majority filter may round its corners).
    assert len(np.unique(labels[y + 1:y + 7, x + 1:x + 7])) == 1
    assert np.mean(labels[y:y + 8, x:x + 8] == labels[y + 4, x + 4]) >= 60 / 64
  assert np.mean(labels == labels[0, 0]) >= 1 - 3 * 64 / (32 * 48)


def test_max_labels_bounds_the_regions_and_oracle_segmenters_are_refused():
  config = _config()
  config.objectives.pseudo_masks.max_labels = 2
  labels = pseudo_masks.make_segmenter(config)(_scene()[None], np.array([0]))[0]
  assert set(np.unique(labels)) == {0, 1}
  config.objectives.discriminative.weight = 1.0  # an objective that uses them
  config.objectives.tap = "dec4"  # a tap of this network (it has no embedding head)
  validate.check_self_training(config, None)
  config.objectives.pseudo_masks.segmenter = "split_merge"  # takes the oracle K
  with pytest.raises(ValueError, match="k='predict'"):
    validate.check_self_training(config, None)
  config.objectives.pseudo_masks.segmenter = "nope"
  with pytest.raises(ValueError, match="names 'nope', which config.eval.segmenters does not"):
    validate.check_self_training(config, None)


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

  def labelling(x, index):  # depends on the image and its index, to check the lookup
    return (x[..., 0] > 0.6).astype(np.int32) + 2 * (index[:, None, None] % 2)

  def segmenter(x, index):
    calls.append(len(x))
    return labelling(x, index)

  path = os.path.join(tmp_path, "pm", "train.npz")
  store = pseudo_masks.load_or_compute(path, lambda: _batches(images), segmenter, "k1")
  assert sum(calls) == 7 and len(store) == 7  # the padded example is skipped
  again = pseudo_masks.load_or_compute(path, lambda: _batches(images), segmenter, "k1")
  assert sum(calls) == 7  # read from the cache
  np.testing.assert_array_equal(again.labels, store.labels)
  # Looked up in any order and layout; padding gets zeros.
  batch = {"index": np.array([[106, 100], [0, 103]]),
           "valid": np.array([[True, True], [False, True]])}
  looked = again.lookup(batch["index"], batch["valid"])
  assert looked.shape == (2, 2, 32, 48) and looked.dtype == np.uint8
  direct = labelling(images[[6, 0, 3]], np.array([106, 100, 103]))
  np.testing.assert_array_equal(looked[[0, 0, 1], [0, 1, 1]], direct)
  assert not looked[1, 0].any()
  with pytest.raises(ValueError, match="no pseudo-masks cached for examples \\[5\\]"):
    again.lookup(np.array([5]))
  # Other settings: computed again.
  pseudo_masks.load_or_compute(path, lambda: _batches(images), segmenter, "k2")
  assert sum(calls) == 14


@pytest.mark.parametrize("damage", ["truncated", "one_byte_flipped", "random_bytes"])
def test_a_damaged_cache_is_computed_again_with_a_warning_naming_it(tmp_path, caplog, damage):
  images = np.stack([_scene(0.01, seed) for seed in range(3)])
  segmenter = lambda x, index: (x[..., 0] > 0.6).astype(np.int32)
  path = os.path.join(tmp_path, "train.npz")
  store = pseudo_masks.load_or_compute(path, lambda: _batches(images), segmenter, "k")
  data = bytearray(open(path, "rb").read())
  if damage == "truncated":
    data = data[:len(data) // 2]
  elif damage == "one_byte_flipped":  # inside the first member's stored bytes
    data[len(data) // 4] ^= 0xFF
  else:
    data = bytearray(np.random.default_rng(0).bytes(len(data)))
  with open(path, "wb") as f:
    f.write(bytes(data))
  with caplog.at_level("WARNING"):
    again = pseudo_masks.load_or_compute(path, lambda: _batches(images), segmenter, "k")
  assert f"the pseudo-mask cache {path} cannot be read" in caplog.text
  np.testing.assert_array_equal(again.labels, store.labels)
  with np.load(path) as stored:  # written again whole
    np.testing.assert_array_equal(stored["labels"], store.labels)


def test_fingerprint_and_paths_follow_the_config(tmp_path):
  config = defaults.get_config("quick")
  key = pseudo_masks.fingerprint(config)
  config.eval.segmenters.split_merge_predict_k.merge_threshold += 0.1
  assert pseudo_masks.fingerprint(config) != key
  changed = pseudo_masks.fingerprint(config)
  config.eval.segmenters.kmeans.num_clusters = 3  # not the pseudo-mask segmenter
  assert pseudo_masks.fingerprint(config) == changed
  assert pseudo_masks.cache_path(config, "/w") == "/w/pseudo_masks/train.npz"
  moved = pseudo_masks.fingerprint(config)
  config.objectives.pseudo_masks.cache_dir = str(tmp_path)
  assert pseudo_masks.fingerprint(config) == moved
  assert pseudo_masks.cache_path(config, "/w", "test") == os.path.join(tmp_path, "test.npz")
  config.objectives.pseudo_masks.max_labels = 300
  config.objectives.discriminative.weight = 1.0  # an objective that uses them
  with pytest.raises(ValueError, match=r"max_labels=300 must be in \[1, 255\]"):
    validate.check_numbers(config)
