"""The hybrid segmenter on hand-made maps: the image's clusters draw
the regions, the learned tap's region means decide which of them merge."""

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from clevr_jax import defaults
from clevr_jax.segmentation import regions
from clevr_jax.segmentation import segmenters

_H, _W = 16, 16
_GREY, _RED, _BLUE, _SHADOW = ((0.5, 0.5, 0.5), (0.8, 0.1, 0.1), (0.1, 0.2, 0.8),
                                (0.2, 0.2, 0.2))
_FAINT_SHADOW = (0.45, 0.45, 0.45)


def _hybrid(name="hybrid_predict_k", **overrides):
  """The configured hybrid, with few K-Means clusters: the maps hold 2-3 colours."""
  config = defaults.base_config()
  seg = segmenters.from_config(name, config.eval.segmenters[name])
  # No majority filter: on 16x16 maps it would round the squares' corners.
  return (dataclasses.replace(seg, num_clusters=4, modal_size=0, **overrides),
          config.eval.kmeans)


def _run(seg, km, image, tap, num_masks=3):
  """Region labels [H, W] of one image and its tap (a learned tap, not the pixels)."""
  num_masks = jnp.array([num_masks])
  target, threshold = segmenters.merge_rule(seg, segmenters.target_k(seg, num_masks),
                                            "embedding", 11)
  labels, _ = segmenters.segment(
      seg, km, jnp.asarray(tap[None]), segmenters.cluster_k(seg, num_masks),
      jax.random.key(0)[None], target, threshold, is_pixels=False, max_regions=32, cap=11,
      pixels=jnp.asarray(image[None]))
  return np.asarray(labels)[0]


def _partition(labels):
  """The set of pixel sets: label numbering aside."""
  return {frozenset(zip(*np.nonzero(labels == v))) for v in np.unique(labels)}


def _codes(*pairs):
  """A learned tap at half the image's resolution: code index per 2x2 block."""
  tap = np.zeros((_H // 2, _W // 2, 4), np.float32)
  tap[...] = np.eye(4)[0]
  for (rows, cols), code in pairs:
    tap[rows, cols] = np.eye(4)[code]
  return tap


def test_two_touching_squares_of_one_colour_are_one_region_of_the_pixels():
  image = np.full((_H, _W, 3), _GREY, np.float32)
  image[4:12, 2:14] = _RED  # two 8x6 squares side by side, touching at column 7|8
  tap = _codes(((slice(2, 6), slice(1, 4)), 1), ((slice(2, 6), slice(4, 7)), 2))
  truth = np.zeros((_H, _W), np.int32)
  truth[4:12, 2:8], truth[4:12, 8:14] = 1, 2
  # The pixels draw the regions: the tap's codes merge regions, never cut one.
  seg, km = _hybrid()
  fused = truth.clip(0, 1)
  assert _partition(_run(seg, km, image, tap)) == _partition(fused)


def test_a_shadow_of_another_colour_with_the_objects_code_joins_the_object():
  image = np.full((_H, _W, 3), _GREY, np.float32)
  image[4:10, 4:10] = _RED
  image[10:12, 4:10] = _SHADOW  # below the object, darker than the floor
  tap = _codes(((slice(2, 6), slice(2, 5)), 1))  # the shadow carries the object's code
  truth = np.zeros((_H, _W), np.int32)
  truth[4:12, 4:10] = 1
  seg, km = _hybrid()
  assert _partition(_run(seg, km, image, tap)) == _partition(truth)
  # Merged by colour instead, the shadow stays apart from the object.
  seg, km = _hybrid(merge_source="pixels")
  assert len(np.unique(_run(seg, km, image, tap))) == 3


def test_a_shadow_the_colour_of_the_floor_joins_the_floor_when_either_source_merges():
  image = np.full((_H, _W, 3), _GREY, np.float32)
  image[4:10, 4:10] = _RED
  image[10:12, 4:10] = _FAINT_SHADOW  # 0.05 darker in Lab L* than the floor
  # The shadow's code lies midway between the floor's and the object's: 0.77
  # from either on the unit sphere, further than the tap's threshold.
  tap = _codes(((slice(2, 5), slice(2, 5)), 1))
  tap[5, 2:5] = (np.eye(4)[0] + np.eye(4)[1]) / np.sqrt(2)
  object_ = np.zeros((_H, _W), np.int32)
  object_[4:10, 4:10] = 1
  shadow_apart = object_.copy()
  shadow_apart[10:12, 4:10] = 2
  seg, km = _hybrid(merge_source="tap")  # the tap alone keeps the shadow apart
  assert _partition(_run(seg, km, image, tap)) == _partition(shadow_apart)
  seg, km = _hybrid()  # the configured rule: its colour is the floor's
  assert seg.merge_source == "tap_or_pixels" and seg.colour_threshold < 0.15
  assert _partition(_run(seg, km, image, tap)) == _partition(object_)
  # Colour alone merges only under its own threshold: not at 0.04.
  seg, km = _hybrid(colour_merge_threshold=0.04)
  assert _partition(_run(seg, km, image, tap)) == _partition(shadow_apart)


def test_the_merge_takes_the_nearest_of_several_sources():
  def merge(labels, sources, threshold=0.5):
    return np.asarray(regions.merge(
        jnp.asarray(labels), jnp.int32(labels.max() + 1),
        [jnp.asarray(np.float32(f)[labels][..., None]) for f in sources], jnp.int32(0),
        jnp.float32(threshold), max_regions=4, cap=3, metric="euclidean"))

  pair = np.repeat(np.arange(2, dtype=np.int32)[None], 2, axis=0)  # A | B
  assert merge(pair, [[0.0, 5.0]]).max() == 1  # far in the one source: apart
  assert merge(pair, [[0.0, 5.0], [0.0, 0.1]]).max() == 0  # near in either: one region
  assert merge(pair, [[0.0, 0.1], [0.0, 5.0]]).max() == 0
  # A | B | C: A-B 0.3 apart in the first source, B-C 0.1 in the second. The
  # nearest pair goes first, and the merged means are then far from A in both.
  strip = np.repeat(np.arange(3, dtype=np.int32)[None], 2, axis=0)
  first, second = [0.0, 0.3, 5.0], [0.0, 5.0, 5.1]
  np.testing.assert_array_equal(merge(strip, [first]), [[0, 0, 1]] * 2)
  np.testing.assert_array_equal(merge(strip, [first, second]), [[0, 1, 1]] * 2)


def test_the_tap_threshold_is_read_from_the_config():
  config = defaults.base_config()
  config.eval.segmenters.hybrid_predict_k.tap_merge_threshold = 1.7
  config.eval.segmenter_names = ("hybrid_predict_k",)
  (seg,) = segmenters.configured(config)
  assert seg.threshold_for("embedding") == 1.7
  assert seg.threshold_for("input") == config.eval.segmenters.hybrid_predict_k.merge_threshold
  # A red and a blue square whose codes are sqrt(2) apart: one region under 1.7,
  # two objects under the default threshold.
  image = np.full((_H, _W, 3), _GREY, np.float32)
  image[4:12, 2:8], image[4:12, 8:14] = _RED, _BLUE
  tap = _codes(((slice(2, 6), slice(1, 4)), 1), ((slice(2, 6), slice(4, 7)), 2))
  km = config.eval.kmeans
  assert len(np.unique(_run(dataclasses.replace(seg, num_clusters=4), km, image, tap))) == 1
  default, _ = _hybrid()
  assert default.tap_merge_threshold < np.sqrt(2)
  assert len(np.unique(_run(default, km, image, tap))) == 3


def test_unet_objects_scores_the_hybrids_under_the_margins_bound():
  from configs import unet_objects  # pylint: disable=g-import-not-at-top
  config = unet_objects.get_config("quick")
  found = {s.name: s for s in segmenters.configured(config)}
  d = config.objectives.discriminative
  # Between the margins' bounds on one instance and on two, one threshold for all.
  threshold = found["hybrid_predict_k"].threshold_for("embedding")
  assert 2 * d.delta_v < threshold < 2 * d.delta_d - 2 * d.delta_v
  assert found["split_merge_predict_k"].threshold_for("embedding") == threshold
  assert threshold == defaults.base_config().eval.segmenters.hybrid_predict_k.tap_merge_threshold
  assert found["hybrid_predict_k"].split_source == "pixels"
  assert found["hybrid"].k == "oracle" and found["hybrid"].uses_pixels


def test_bad_sources_are_clear_errors():
  def check(entry):
    segmenters.from_config("hybrid", entry).check()

  entry = defaults.base_config().eval.segmenters.hybrid
  check(entry)
  entry.split_source = "colour"
  with pytest.raises(ValueError, match="split_source='colour': choose one of"):
    check(entry)
  entry.split_source, entry.split = "pixels", False
  with pytest.raises(ValueError, match="split=True"):
    check(entry)
  entry.split, entry.merge_source = True, "tap_or_pixels"
  entry.merge_threshold = entry.colour_merge_threshold = 0.0
  with pytest.raises(ValueError, match="colour_merge_threshold"):
    check(entry)


def test_the_protocol_scores_a_hybrid_on_a_learned_tap_on_the_devices():
  # The sharded program gets the images besides the tap: a red and a blue
  # square with codes of their own come apart, so the tables give poster mIoU 1.
  from clevr_jax.segmentation import kmeans  # pylint: disable=g-import-not-at-top
  from clevr_jax import metrics  # pylint: disable=g-import-not-at-top
  from clevr_jax import sharding  # pylint: disable=g-import-not-at-top
  from clevr_jax.evaluation import protocol  # pylint: disable=g-import-not-at-top
  config = defaults.get_config("test")
  config.data.image_height, config.data.image_width = _H, _W
  seg, _ = _hybrid()
  image = np.full((_H, _W, 3), _GREY, np.float32)
  image[4:12, 2:8], image[4:12, 8:14] = _RED, _BLUE
  tap = _codes(((slice(2, 6), slice(1, 4)), 1), ((slice(2, 6), slice(4, 7)), 2))
  truth = np.zeros((_H, _W), np.int32)
  truth[4:12, 2:8], truth[4:12, 8:14] = 1, 2
  mesh = sharding.make_mesh()
  batch = sharding.to_global({"image": image[None], "instance_labels": truth[None],
                              "num_masks": np.array([3], np.int32),
                              "index": np.zeros(1, np.int32), "tap": tap[None]}, mesh)
  runner = protocol.Runner(config, mesh, [seg])
  keys = kmeans.image_keys(0, batch["index"])
  tables = runner.collect(seg, "embedding", runner.dispatch(seg, "embedding", batch["tap"],
                                                            batch, keys), np.ones(1, bool))
  assert metrics.score_tables(tables, np.array([3])).poster_miou[0] == pytest.approx(1.0)


def test_results_name_the_hybrids_sources():
  from clevr_jax.evaluation import results  # pylint: disable=g-import-not-at-top
  seg, _ = _hybrid()
  text = results.results_markdown(
      {"name": "x", "checkpoint_step": 0, "num_images": 1,
       "segmenters": {seg.name: {"embedding": {"poster_miou": 1.0}}},
       "segmenter_specs": {seg.name: results.spec_dict(seg)}})
  assert "regions from pixels, merged by tap or pixels means" in text
  assert (f"(taps: {seg.tap_merge_threshold:g}, or colour < "
          f"{seg.colour_merge_threshold:g})") in text
