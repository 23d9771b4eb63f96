"""The shape split (regions.shape_split) and its SciPy reference on hand-made
region maps: touching blobs of one colour come apart at their waist; single
objects (a sphere with a highlight, a cube's faces, an L-shaped block) do not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clevr_jax.segmentation import regions
from clevr_jax.segmentation import spec
from tests.oracles import postprocess_reference

_H, _W = 48, 64
_SLOTS = 16
_ARGS = dict(min_radius=3.0, waist=0.7, max_area=1500)
_YY, _XX = np.mgrid[:_H, :_W]


def _disc(cy, cx, r):
  return (_YY - cy) ** 2 + (_XX - cx) ** 2 <= r * r


def _polygon(points):
  """Pixels inside a convex polygon given counter-clockwise in (x, y)."""
  inside = np.ones((_H, _W), bool)
  for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
    inside &= (x1 - x0) * (_YY - y0) - (y1 - y0) * (_XX - x0) >= 0
  return inside


def _map(*masks):
  labels = np.zeros((_H, _W), np.int32)
  for value, mask in enumerate(masks, start=1):
    labels[mask] = value
  return labels


def _cube(one_region):
  """A cube seen from above a corner: three rhombi that tile a hexagon."""
  cy, cx, r = 24, 32, 13
  corner = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.radians(np.arange(
      -150, 210, 60))]
  centre = (cx, cy)
  faces = [_polygon([centre, corner[i], corner[i + 1], corner[i + 2]][::-1])
           for i in (0, 2, 4) if i + 2 < 6] + [_polygon([centre, corner[4], corner[5],
                                                          corner[0]][::-1])]
  if one_region:
    return _map(faces[0] | faces[1] | faces[2])
  return _map(*faces)


MAPS = {
    "two touching discs": (_map(_disc(24, 20, 10) | _disc(24, 39, 9)), 2),
    "two overlapping discs": (_map(_disc(24, 21, 10) | _disc(25, 37, 9)), 2),
    "a disc with a highlight": (_map(_disc(24, 30, 12), _disc(20, 26, 3)), 1),
    "a cube's three faces": (_cube(one_region=False), 1),
    "a cube as one region": (_cube(one_region=True), 1),
    "an L-shaped block": (_map(np.pad(np.ones((28, 14), bool), ((10, 10), (10, 40)))
                               | np.pad(np.ones((10, 40), bool), ((28, 10), (10, 14)))), 1),
}


@jax.jit
def _compiled(labels, min_radius, waist, max_area):
  return regions.shape_split(labels, min_radius=min_radius, waist=waist, max_area=max_area,
                             max_regions=_SLOTS)


def _device(labels, *, min_radius, waist, max_area):
  """The device step; its settings are traced, so one compile serves every test."""
  return _compiled(labels, jnp.float32(min_radius), jnp.float32(waist), jnp.int32(max_area))


def _split(which, labels):
  if which == "device":
    out, cut_from = _device(jnp.asarray(labels), **_ARGS)
    return np.asarray(out), np.asarray(cut_from)
  return postprocess_reference.shape_split(labels, max_regions=_SLOTS, **_ARGS)


@pytest.mark.parametrize("which", ["device", "reference"])
@pytest.mark.parametrize("name", list(MAPS))
def test_each_object_is_one_part(which, name):
  labels, objects = MAPS[name]
  out, cut_from = _split(which, labels)
  new = np.unique(out[out >= labels.max() + 1])
  # Every region keeps its pixels, but those of the parts cut from it.
  kept = out <= labels.max()
  np.testing.assert_array_equal(out[kept], labels[kept])
  assert len(new) == objects - 1, name
  for slot in new:
    host = cut_from[slot]
    assert np.all(labels[out == slot] == host)
    assert (out == host).sum() > 0.3 * (labels == host).sum()


@pytest.mark.parametrize("name", ["two touching discs", "two overlapping discs"])
def test_the_cut_runs_through_the_waist(name):
  labels, _ = MAPS[name]
  for which in ("device", "reference"):
    out, _ = _split(which, labels)
    left, right = out[:, :29], out[:, 29:]
    fg_left, fg_right = labels[:, :29] > 0, labels[:, 29:] > 0
    # Nearly all of the left disc is one part, nearly all of the right the other.
    assert np.mean(left[fg_left] == 1) > 0.95 and np.mean(right[fg_right] == 2) > 0.9, which


def test_device_and_reference_agree_pixel_for_pixel_off_ties():
  for name, (labels, _) in MAPS.items():
    device, device_from = _split("device", labels)
    reference, reference_from = _split("reference", labels)
    # Pixels equidistant from two seeds may go either way: at most the cut's line.
    assert np.mean(device != reference) < 0.01, name
    np.testing.assert_array_equal(device_from, reference_from)


def test_a_narrow_waist_is_kept_a_wide_one_is_not():
  labels = MAPS["two overlapping discs"][0]
  for which in ("device", "reference"):
    for waist, parts in ((0.5, 1), (0.7, 2)):
      if which == "device":
        out, _ = _device(jnp.asarray(labels), min_radius=3.0, waist=waist, max_area=1500)
      else:
        out, _ = postprocess_reference.shape_split(labels, min_radius=3.0, waist=waist,
                                                   max_area=1500, max_regions=_SLOTS)
      assert len(np.unique(np.asarray(out))) - 1 == parts, (which, waist)


def test_large_regions_and_regions_on_the_border_are_not_cut():
  labels = MAPS["two touching discs"][0]
  out, _ = _device(jnp.asarray(labels), min_radius=3.0, waist=0.7, max_area=300)
  assert np.array_equal(np.asarray(out), labels)
  shifted = np.roll(labels, -14, axis=1)  # the left disc runs off the image
  out, _ = _device(jnp.asarray(shifted), **_ARGS)
  assert np.array_equal(np.asarray(out), shifted)


@pytest.mark.parametrize("which", ["device", "reference"])
def test_parts_of_one_colour_stay_apart_through_the_merge(which):
  labels = MAPS["two touching discs"][0]
  features = np.where(labels[..., None] > 0, [0.5, 0.2, 0.1], [0.6, 0.0, 0.0])
  features = features.astype(np.float32)
  common = dict(num_labels=2, modal_size=0, split=True, min_area=0, max_regions=_SLOTS,
                cap=11, metric="euclidean")
  if which == "device":
    out, _ = jax.jit(functools.partial(regions.postprocess, **common,
                                       shape_split_args=_ARGS))(
        jnp.asarray(labels), jnp.asarray(features), jnp.int32(0), jnp.float32(0.2))
    out = np.asarray(out)
  else:
    out = postprocess_reference.postprocess_one(
        labels, features, modal_size=0, split=True, min_area=0, merge=True,
        metric="euclidean", target=None, threshold=0.2, max_regions=11,
        shape_split_args=_ARGS, region_slots=_SLOTS)
  assert len(np.unique(out)) == 3  # the floor and two discs
  # A target K joins them when nothing else is left to merge.
  if which == "reference":
    out = postprocess_reference.postprocess_one(
        labels, features, modal_size=0, split=True, min_area=0, merge=True,
        metric="euclidean", target=2, threshold=None, max_regions=11,
        shape_split_args=_ARGS, region_slots=_SLOTS)
    assert len(np.unique(out)) == 2


def test_bad_shape_split_settings_are_one_line_naming_the_field():
  with pytest.raises(ValueError, match=r"shape_split_waist=1.5 must be in \(0, 1\)"):
    spec.Segmenter(name="x", split=True, shape_split=True, shape_split_waist=1.5).check()
  with pytest.raises(ValueError, match=r"shape_split_max_area=0 must be a number|"
                     r"shape_split_max_area=0 must be in"):
    spec.Segmenter(name="x", split=True, shape_split=True, shape_split_max_area=0).check()
  with pytest.raises(ValueError, match=r"shape_split cuts .*split=True"):
    spec.Segmenter(name="x", shape_split=True).check()
