"""Tests of clevr_jax.objects.views: geometric views and their pixel correspondence."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clevr_jax import defaults
from clevr_jax.objects import views

# XLA:CPU compiles threefry draws slowly (seconds each); 'rbg' keys compile fast.
_key = functools.partial(jax.random.key, impl="rbg")

H, W = 24, 32
B = 6


def _view_config(**overrides):
  config = ml_collections.ConfigDict(defaults.objectives_config().views.to_dict())
  config.update(overrides)
  return config


def _params(seed, **overrides):
  keys = jax.random.split(_key(seed), B)
  return views.sample_params(keys, _view_config(**overrides))


def _coordinate_image():
  """Each pixel holds its own normalised centre (y, x): a linear function of
  position, which bilinear interpolation reproduces exactly (up to rounding)."""
  return jnp.broadcast_to(views.pixel_centres(H, W), (B, H, W, 2))


# Coordinates are in [0, 1] and every sample goes through a few float32
# multiply-adds, each with relative error <= 2**-24 ~ 6e-8: 1e-5 is two orders
# of magnitude above the worst case, and far below one pixel (1/32).
TOL = 1e-5


def test_params_are_crops_inside_the_image():
  params = _params(0, min_scale=0.2, max_scale=0.6)
  box = np.asarray(params['box'])
  assert box.shape == (B, 4) and params['flip'].shape == (B,)
  assert np.all(box[:, :2] >= 0) and np.all(box[:, :2] + box[:, 2:] <= 1 + 1e-6)
  area = box[:, 2] * box[:, 3]
  assert np.all(area <= 0.6 + 1e-6) and np.all(area > 0)
  # Different keys give different crops.
  assert len(np.unique(box[:, 0])) == B


def test_source_and_view_coordinates_are_inverse():
  params = _params(1)
  yx = jax.random.uniform(_key(2), (B, 50, 2))
  back = views.view_to_source(params, views.source_to_view(params, yx))
  np.testing.assert_allclose(back, yx, atol=TOL)


def test_identity_and_flip_views():
  image = jax.random.uniform(_key(3), (B, H, W, 3))
  identity = views.identity_params(B)
  np.testing.assert_allclose(views.render(image, identity), image, atol=TOL)
  flipped = dict(identity, flip=jnp.ones((B,), bool))
  np.testing.assert_allclose(views.render(image, flipped), image[:, :, ::-1], atol=TOL)
  labels = jnp.arange(B * H * W).reshape(B, H, W)
  np.testing.assert_array_equal(views.render(labels, flipped, nearest=True),
                                labels[:, :, ::-1])


def test_correspondence_maps_a_pixel_of_one_view_to_the_same_source_pixel():
  coords = _coordinate_image()
  pa, pb = _params(4), _params(5)
  view_a = views.render(coords, pa)
  view_b = views.render(coords, pb)
  centres = jnp.broadcast_to(views.pixel_centres(H, W).reshape(1, H * W, 2), (B, H * W, 2))
  in_b = views.correspond(pa, pb, centres)
  # View a's pixel holds the source point it shows; view b, sampled where the
  # correspondence says that point lies, holds the same point.
  shown_a = view_a.reshape(B, H * W, 2)
  shown_b = views.sample_bilinear(view_b, in_b)
  # Compare where the interpolations are linear: source points away from the
  # image border (clamped there) and inside view b's pixel centres.
  margin_src = np.array([1 / H, 1 / W])
  margin_view = np.array([0.5 / H, 0.5 / W])
  source = np.asarray(views.view_to_source(pa, centres))
  inside = (np.all(source > margin_src, -1) & np.all(source < 1 - margin_src, -1)
            & np.all(np.asarray(in_b) > margin_view, -1)
            & np.all(np.asarray(in_b) < 1 - margin_view, -1))
  assert inside.sum() > 0.2 * inside.size  # the check is not vacuous
  np.testing.assert_allclose(np.asarray(shown_a)[inside], source[inside], atol=TOL)
  np.testing.assert_allclose(np.asarray(shown_b)[inside], source[inside], atol=TOL)


def test_nearest_render_copies_the_source_pixel_under_each_view_pixel():
  ids = jnp.broadcast_to(jnp.arange(H * W).reshape(1, H, W), (B, H, W))
  params = _params(6)
  view = np.asarray(views.render(ids, params, nearest=True)).reshape(B, H * W)
  centres = jnp.broadcast_to(views.pixel_centres(H, W).reshape(1, H * W, 2), (B, H * W, 2))
  source = np.asarray(views.view_to_source(params, centres))
  expected = (np.clip(np.floor(source[..., 0] * H), 0, H - 1) * W
              + np.clip(np.floor(source[..., 1] * W), 0, W - 1))
  np.testing.assert_array_equal(view, expected.astype(view.dtype))


def test_shared_points_are_in_both_views():
  pa, pb = _params(7, min_scale=0.5), _params(8, min_scale=0.5)
  keys = jax.random.split(_key(9), B)
  src, in_a, in_b, valid = views.shared_points(keys, pa, pb, 40)
  assert src.shape == in_a.shape == in_b.shape == (B, 40, 2)
  # Two crops of at least half the area each overlap whenever both contain the
  # centre; in any case every valid example's points lie in both views.
  for yx in (in_a, in_b):
    ok = np.all((np.asarray(yx) >= -TOL) & (np.asarray(yx) <= 1 + TOL), axis=(1, 2))
    assert np.all(ok | ~np.asarray(valid))
  np.testing.assert_allclose(views.view_to_source(pa, in_a), src, atol=TOL)
  np.testing.assert_allclose(views.view_to_source(pb, in_b), src, atol=TOL)


def test_example_keys_follow_the_index_not_the_position():
  # JAX's default threefry keys ('rbg' draws under vmap need not match per example).
  key = jax.random.key(10)
  a = views.example_keys(key, jnp.array([3, 5, 7]))
  b = views.example_keys(key, jnp.array([7, 3]))
  draw = lambda ks: np.asarray(jax.vmap(lambda k: jax.random.uniform(k))(ks))
  np.testing.assert_array_equal(draw(a)[[2, 0]], draw(b))
