"""Tests of clevr_jax.training.losses on hand-made images and NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clevr_jax import schema
from clevr_jax.training import losses

GRAY = (0.5, 0.5, 0.5)
RED = (1.0, 0.0, 0.0)


def _image(pixels, width=2):
  """A [1, H, width, 3] float32 image from a row-major list of RGB tuples."""
  return np.asarray(pixels, np.float32).reshape(1, -1, width, 3)


def test_mse():
  pred = np.zeros((2, 2, 2, 3), np.float32)
  target = np.full_like(pred, 0.5)
  np.testing.assert_allclose(losses.mse(pred, target), 0.25)
  w = np.ones((2, 2, 2), np.float32)
  np.testing.assert_allclose(losses.mse(pred, target, w), 0.25)


def test_weights_three_gray_one_colored():
  image = _image([GRAY, GRAY, GRAY, RED])
  gray = losses.gray_pixel_map(image)
  np.testing.assert_array_equal(gray, [[[True, True], [True, False]]])
  w = np.asarray(losses.inverse_frequency_weights(gray))
  np.testing.assert_allclose(w, [[[4 / 6, 4 / 6], [4 / 6, 4 / 2]]], rtol=1e-6)
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
  # Each group carries half of the total weight.
  np.testing.assert_allclose(w[gray].sum(), w[~gray].sum(), rtol=1e-6)


def test_weighted_mse_is_mean_of_group_mses():
  image = _image([GRAY, GRAY, GRAY, RED])
  gray = np.asarray(losses.gray_pixel_map(image))
  pred = image + np.array([0.1, 0.2, 0.3, 0.4], np.float32).reshape(1, 2, 2, 1)
  sq = ((pred - image)**2).mean(-1)
  expected = 0.5 * (sq[gray].mean() + sq[~gray].mean())
  w = losses.inverse_frequency_weights(gray)
  np.testing.assert_allclose(losses.weighted_mse(pred, image, w), expected, rtol=1e-5)
  np.testing.assert_allclose(losses.mse(pred, image, w), expected, rtol=1e-5)
  # Unweighted, the three gray pixels would dominate.
  assert not np.isclose(losses.mse(pred, image), expected)


@pytest.mark.parametrize('color', [GRAY, RED])
def test_absent_group(color):
  gray = losses.gray_pixel_map(_image([color] * 6))
  np.testing.assert_allclose(losses.inverse_frequency_weights(gray), np.ones((1, 3, 2)))


def test_valid_mask():
  image = _image([GRAY, GRAY, GRAY, RED, RED, GRAY])
  gray = losses.gray_pixel_map(image)
  valid = np.array([[[True, True], [True, True], [False, False]]])
  w = np.asarray(losses.inverse_frequency_weights(gray, valid))
  # Padding gets nothing; the valid pixels (3 gray, 1 red) are weighted as on their own.
  np.testing.assert_allclose(w, [[[4 / 6, 4 / 6], [4 / 6, 2], [0, 0]]], rtol=1e-6)
  np.testing.assert_allclose(w[valid].mean(), 1.0, rtol=1e-6)
  # Averaged over valid pixels only, the weighted error is still the mean of group MSEs.
  sq = np.arange(6, dtype=np.float32).reshape(1, 3, 2)
  g = np.asarray(gray) & valid
  c = ~np.asarray(gray) & valid
  np.testing.assert_allclose((w * sq)[valid].mean(), 0.5 * (sq[g].mean() + sq[c].mean()),
                             rtol=1e-6)
  # No valid pixel at all: all weights zero, no NaN.
  w = losses.inverse_frequency_weights(gray, np.zeros_like(valid))
  np.testing.assert_array_equal(w, np.zeros((1, 3, 2)))


def test_weights_independent_of_device_split():
  """Counts summed over the data-parallel axis weight a global batch as a whole."""
  rng = np.random.default_rng(0)
  gray = rng.random((4, 6, 8)) < 0.7
  whole = losses.inverse_frequency_weights(gray)
  split = jax.vmap(lambda g: losses.inverse_frequency_weights(g, axis_name='batch'),
                   axis_name='batch')(gray.reshape(2, 2, 6, 8))
  np.testing.assert_allclose(split.reshape(whole.shape), whole, rtol=1e-6)
  per_device = jax.vmap(losses.inverse_frequency_weights)(gray.reshape(2, 2, 6, 8))
  assert not np.allclose(per_device.reshape(whole.shape), whole)


def test_weights_under_jit():
  gray = losses.gray_pixel_map(_image([GRAY, GRAY, GRAY, RED]))
  np.testing.assert_allclose(jax.jit(losses.inverse_frequency_weights)(gray),
                             losses.inverse_frequency_weights(gray))


def test_gray_threshold_at_ten_levels():
  # As the pipeline produces them: 8-bit values scaled to [0, 1] in float32.
  pixels = np.array([[120, 110, 110],   # spread 10: gray
                     [121, 110, 110],   # spread 11: not gray
                     [200, 210, 205],   # spread 10: gray
                     [0, 0, 0],
                     [255, 255, 255],
                     [110, 110, 121]], np.uint8)
  rgb = pixels.astype(np.float32) / 255
  np.testing.assert_array_equal(losses.gray_pixel_map(rgb[None]),
                                [[True, False, True, True, True, False]])
  assert schema.GRAY_TOLERANCE == 10 / 255


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_pixel_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=(2, 4, 6))
  nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), labels[..., None],
                            -1)[..., 0]
  np.testing.assert_allclose(losses.pixel_cross_entropy(logits, labels), nll.mean(),
                             rtol=1e-5)
  valid = rng.random((2, 4, 6)) < 0.5
  np.testing.assert_allclose(losses.pixel_cross_entropy(logits, labels, valid),
                             nll[valid].mean(), rtol=1e-5)
  bf16 = losses.pixel_cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, nll.mean(), rtol=2e-2)


def test_to_grayscale():
  rgb = np.array([[RED, (0, 1, 0)], [(0, 0, 1), (1, 1, 1)]], np.float32)
  gray = losses.to_grayscale(rgb)
  assert gray.shape == (2, 2, 1)
  np.testing.assert_allclose(gray[..., 0], [[0.299, 0.587], [0.114, 1.0]], rtol=1e-6)
  np.testing.assert_allclose(losses.to_grayscale(np.full((3,), 0.5, np.float32)), [0.5],
                             rtol=1e-6)
