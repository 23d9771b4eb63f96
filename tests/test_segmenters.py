"""The segmenter engine on hand-made inputs: each transform, each post-processing
step, and a whole segmenter on a scene whose answer is known."""

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from clevr_jax import defaults
from clevr_jax import metrics
from clevr_jax import validate
from clevr_jax.segmentation import kmeans
from tests.oracles import postprocess_reference
from clevr_jax.segmentation import regions
from clevr_jax.segmentation import segmenters
from clevr_jax.segmentation import spec
from clevr_jax.segmentation import transforms



def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# Transforms.


def test_l2_normalize_gives_unit_vectors_and_keeps_zero_vectors():
  x = _rng().normal(size=(2, 3, 4, 5)).astype(np.float32)
  x[0, 0, 0] = 0
  y = np.asarray(transforms.l2_normalize(jnp.asarray(x)))
  norms = np.linalg.norm(y, axis=-1)
  assert norms[0, 0, 0] == 0
  np.testing.assert_allclose(np.delete(norms.reshape(-1), 0), 1.0, atol=1e-6)


def test_standardize_is_per_image_and_channel():
  x = _rng().normal(size=(2, 6, 7, 3)).astype(np.float32) * [1, 10, 100] + [5, -3, 0]
  y = np.asarray(transforms.standardize(jnp.asarray(x)))
  np.testing.assert_allclose(y.mean(axis=(1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=(1, 2)), 1, atol=1e-4)
  # Image 0's result does not depend on image 1.
  alone = np.asarray(transforms.standardize(jnp.asarray(x[:1])))
  np.testing.assert_array_equal(alone[0], y[0])


def test_pca_keeps_the_distances_of_data_of_lower_rank():
  # Rank-2 data embedded in 6 channels: projecting on 2 axes loses nothing.
  rng = _rng(1)
  low = rng.normal(size=(1, 40, 2))
  x = (low @ rng.normal(size=(2, 6)) + rng.normal(size=6)).reshape(1, 5, 8, 6)
  y = np.asarray(transforms.pca(jnp.asarray(x, jnp.float32), 2)).reshape(40, 2)
  assert y.shape == (40, 2)
  flat = x.reshape(40, 6)
  d_in = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
  d_out = np.linalg.norm(y[:, None] - y[None], axis=-1)
  # float32 eigh/projection of values of order 10: errors of order 1e-5 relative.
  np.testing.assert_allclose(d_out, d_in, atol=1e-3 * d_in.max())


def test_rgb_to_lab_matches_the_cie_reference_values():
  # CIE L*a*b* (D65) of sRGB white, black, red, green, blue (standard tables).
  rgb = jnp.asarray([[[[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]]], jnp.float32)
  lab = np.asarray(transforms.rgb_to_lab(rgb))[0, 0] * 100
  expected = [[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18],
              [32.30, 79.19, -107.86]]
  np.testing.assert_allclose(lab, expected, atol=0.05)


def test_xy_and_hypercolumn_shapes_and_weights():
  x = jnp.zeros((2, 4, 6, 3))
  y = np.asarray(transforms.append_xy(x, 0.5))
  assert y.shape == (2, 4, 6, 5)
  assert y[0, -1, -1, 3:].tolist() == [0.5, 0.5] and y[0, 0, 0, 3:].tolist() == [0, 0]
  rng = _rng(2)
  fine = jnp.asarray(rng.normal(size=(1, 8, 8, 4)) * 100, jnp.float32)
  coarse = jnp.asarray(rng.normal(size=(1, 2, 2, 16)), jnp.float32)
  h = np.asarray(transforms.hypercolumn([fine, coarse]))
  assert h.shape == (1, 8, 8, 20)
  # Each tap carries the same total variance, whatever its width and scale.
  np.testing.assert_allclose(h[..., :4].var(axis=(0, 1, 2)).sum(), 1.0, rtol=1e-4)
  np.testing.assert_allclose(h[..., 4:].var(axis=(0, 1, 2)).sum(), 1.0, rtol=1e-4)


def test_unknown_transform_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown feature transform"):
    spec.parse_transforms("lab,hsv")


# ---------------------------------------------------------------------------
# Post-processing on hand-made label maps: each step of the device program
# (regions.py) and of its SciPy reference (postprocess_reference.py).

_SLOTS = 128  # region slots (R) of the device steps in these tests


@functools.partial(jax.jit, static_argnames=("num_labels", "split", "min_area"))
def _compact(labels, *, num_labels, split, min_area):
  root = regions.root_map(labels, num_labels, split)
  return regions.compact(labels, root, num_labels, min_area, _SLOTS)


class _Device:
  """The device steps with the reference's signatures (one image, NumPy in and out)."""

  @staticmethod
  def modal_filter(labels, size):
    return np.asarray(regions.modal_filter(jnp.asarray(labels), int(labels.max()) + 1, size))

  @staticmethod
  def split_components(labels):
    out, _ = _compact(jnp.asarray(labels), num_labels=int(labels.max()) + 1, split=True,
                      min_area=0)
    return np.asarray(out)

  @staticmethod
  def absorb_small(labels, min_area):
    out, _ = _compact(jnp.asarray(labels), num_labels=int(labels.max()) + 1, split=False,
                      min_area=min_area)
    return np.asarray(out)

  @staticmethod
  def merge_regions(labels, features, *, metric="euclidean", num_regions=None,
                    threshold=None, max_regions=None, border_factor=1.0):
    return np.asarray(_merge(
        jnp.asarray(labels), jnp.int32(labels.max() + 1), jnp.asarray(features, jnp.float32),
        jnp.int32(num_regions or 0), jnp.float32(np.inf if threshold is None else threshold),
        cap=max_regions or _SLOTS, metric=metric, border_factor=border_factor))

  @staticmethod
  def refine(labels, features, *, steps, metric="euclidean"):
    return np.asarray(_refine(jnp.asarray(labels), jnp.asarray(features, jnp.float32),
                              steps=steps, metric=metric))


@functools.partial(jax.jit, static_argnames=("steps", "metric"))
def _refine(labels, features, *, steps, metric):
  return regions.refine(labels, features, steps=steps, max_regions=_SLOTS, metric=metric)


@functools.partial(jax.jit, static_argnames=("cap", "metric", "border_factor"))
def _merge(labels, count, features, target, threshold, *, cap, metric, border_factor=1.0):
  return regions.merge(labels, count, features, target, threshold, max_regions=_SLOTS,
                       cap=cap, metric=metric, border_factor=border_factor)


@pytest.fixture(params=["device", "reference"])
def postprocess(request):
  return _Device if request.param == "device" else postprocess_reference


def _two_squares():
  labels = np.zeros((20, 30), np.int32)
  labels[2:8, 2:8] = 1
  labels[10:16, 20:26] = 1  # the same cluster, apart
  return labels


def test_two_same_coloured_squares_apart_become_two_regions(postprocess):
  regions = postprocess.split_components(_two_squares())
  assert len(np.unique(regions)) == 3
  assert regions[3, 3] != regions[12, 22]
  assert regions[3, 3] != regions[0, 0]


def test_diagonal_neighbours_are_not_connected(postprocess):
  labels = np.zeros((4, 4), np.int32)
  labels[0, 0] = labels[1, 1] = 1
  assert len(np.unique(postprocess.split_components(labels))) == 3


def test_a_speck_is_absorbed_by_the_region_around_it(postprocess):
  regions = np.zeros((20, 20), np.int32)
  regions[10:20] = 1
  regions[4, 4] = 2  # a one-pixel speck inside region 0
  regions[15, 15] = 3  # and one inside region 1
  out = postprocess.absorb_small(regions, min_area=5)
  assert len(np.unique(out)) == 2
  assert out[4, 4] == out[0, 0] and out[15, 15] == out[19, 19]
  np.testing.assert_array_equal(out == out[0, 0], np.arange(20)[:, None].repeat(20, 1) < 10)


def test_absorbing_when_every_region_is_small_keeps_the_largest(postprocess):
  regions = np.arange(12).reshape(3, 4) % 3
  regions[0, :] = 0
  out = postprocess.absorb_small(regions, min_area=100)
  assert len(np.unique(out)) == 1


def _stripes_scene():
  """Five vertical stripes with mean colours 0, 0.1, 0.5, 0.55, 1 (one channel)."""
  regions = np.repeat(np.arange(5), 4)[None].repeat(6, 0)
  colours = np.array([0.0, 0.1, 0.5, 0.55, 1.0])
  return regions, colours[regions][..., None]


def test_merge_to_k_stops_at_k_and_merges_the_closest_first(postprocess):
  regions, features = _stripes_scene()
  for k in (5, 4, 3, 2, 1):
    out = postprocess.merge_regions(regions, features, num_regions=k)
    assert len(np.unique(out)) == k
  out = postprocess.merge_regions(regions, features, num_regions=3)
  # The two closest pairs (0.5 / 0.55, then 0 / 0.1) merged; 1.0 stays alone.
  assert out[0, 0] == out[0, 4] and out[0, 8] == out[0, 12]
  assert len({out[0, 0], out[0, 8], out[0, 16]}) == 3


def test_only_adjacent_regions_merge(postprocess):
  # Regions 0 and 2 have equal colours but are not adjacent: 0 merges with 1.
  regions = np.repeat(np.arange(3), 3)[None].repeat(3, 0)
  features = np.array([0.0, 0.3, 0.0])[regions][..., None]
  out = postprocess.merge_regions(regions, features, num_regions=2)
  assert out[0, 0] == out[0, 3] != out[0, 6]


def test_threshold_merge_predicts_k_on_a_known_scene(postprocess):
  regions, features = _stripes_scene()
  out = postprocess.merge_regions(regions, features, threshold=0.2)
  assert len(np.unique(out)) == 3  # {0, 0.1}, {0.5, 0.55}, {1}
  out = postprocess.merge_regions(regions, features, threshold=0.01)
  assert len(np.unique(out)) == 5
  # max_regions caps the count even above the threshold.
  out = postprocess.merge_regions(regions, features, threshold=0.01, max_regions=2)
  assert len(np.unique(out)) == 2


def test_the_border_factor_keeps_an_object_of_nearly_the_floors_colour(postprocess):
  # Two shades of floor (0.1 apart, both on the border) and a grey square off the
  # border 0.13 from the nearer shade: under 0.2 all merge; with the factor 2 the
  # square's distance to the floor counts double and it stays; the floor still joins.
  labels = np.zeros((20, 30), np.int32)
  labels[:, 15:] = 1
  labels[6:12, 8:14] = 2
  features = np.select([labels == 0, labels == 1], [0.5, 0.6], 0.37)[..., None]
  features = np.repeat(features, 3, axis=-1).astype(np.float32) / np.sqrt(3)
  for factor, expected in ((1.0, 1), (2.0, 2)):
    merged = postprocess.merge_regions(labels, features, threshold=0.2,
                                       border_factor=factor)
    assert len(np.unique(merged)) == expected, factor
  assert merged[0, 0] == merged[0, -1] != merged[8, 10]


def test_the_border_factor_merges_in_the_same_order_on_device_and_reference():
  # Random regions, some on the border: the same order, so the same labels.
  absorbed = postprocess_reference.absorb_small(
      postprocess_reference.split_components(_blobs(1)), 6)
  rng = _rng(1)
  features = (rng.normal(size=absorbed.shape + (3,))
              + 3 * rng.normal(size=(absorbed.max() + 1, 3))[absorbed]).astype(np.float32)
  for kw in (dict(threshold=1.0), dict(num_regions=3)):
    np.testing.assert_array_equal(
        _Device.merge_regions(absorbed, features, max_regions=11, border_factor=1.5, **kw),
        postprocess_reference.merge_regions(absorbed, features, max_regions=11,
                                            border_factor=1.5, **kw))


def _disc(h=20, w=24, radius=6.0, centre=(10, 11)):
  yy, xx = np.mgrid[:h, :w]
  return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_refine_gives_back_the_rim_that_the_filter_took(postprocess):
  disc = _disc()
  colour = np.where(disc[..., None], [1.0, 0.2, 0.0], [0.0, 0.0, 0.3]).astype(np.float32)
  p = np.pad(disc, 1)
  eroded = disc & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  assert eroded.sum() < disc.sum()  # the rim is on the floor's side
  out = postprocess.refine(eroded.astype(np.int32), colour, steps=3)
  np.testing.assert_array_equal(out, disc.astype(np.int32))


def test_refine_keeps_a_highlight_and_renumbers_a_region_it_empties(postprocess):
  disc = _disc()
  colour = np.where(disc[..., None], [0.5, 0.0, 0.0], [0.0, 0.0, 0.3]).astype(np.float32)
  colour[9:12, 10:13] = [1.0, 1.0, 1.0]  # a highlight inside the object
  labels = np.where(disc, 2, 0)
  labels[9:12, 10:13] = 3
  # A region across the rim, one pixel of each side: each goes to its own side.
  assert disc[10, 17] and not disc[10, 18]
  labels[10, 17:19] = 1
  out = postprocess.refine(labels, colour, steps=2)
  expected = np.where(disc, 1, 0)
  expected[9:12, 10:13] = 2
  np.testing.assert_array_equal(out, expected)


def test_refine_leaves_boundaries_on_colour_edges_alone(postprocess):
  # A cube's three faces (three shades of one colour) and an L-shaped object on a
  # floor, each labelled exactly: every pixel is nearest its own region's mean.
  labels = np.zeros((20, 24), np.int32)
  labels[3:8, 4:12], labels[8:14, 4:8], labels[8:14, 8:12] = 1, 2, 3
  labels[12:18, 15:17], labels[16:18, 17:22] = 4, 4
  shade = np.array([[0.2, 0.2, 0.2], [0.9, 0.3, 0.2], [0.6, 0.2, 0.1], [0.4, 0.1, 0.1],
                    [0.1, 0.3, 0.8]], np.float32)
  colour = shade[labels] + 0.02 * _rng(3).normal(size=labels.shape + (3,)).astype(np.float32)
  np.testing.assert_array_equal(postprocess.refine(labels, colour, steps=3), labels)


def _refine_margin(labels, features, steps):
  """The smallest gap, over rounds and pixels, between a pixel's nearest candidate
  mean and its nearest one of another label (the reference's rounds)."""
  smallest = np.inf
  for _ in range(steps):
    cands, d = postprocess_reference.refine_candidates(labels, features)
    pixels = np.arange(labels.size)
    best = np.argmin(d, 0)
    winner = cands[best, pixels]
    other = np.where(cands != winner[None], d, np.inf).min(0)
    smallest = min(smallest, float(np.min(other - d[best, pixels])))
    labels = winner.reshape(labels.shape)
  return smallest


@pytest.mark.parametrize("seed", range(4))
def test_refine_equals_the_reference_on_random_maps(seed):
  labels = postprocess_reference.split_components(_blobs(seed))
  rng = _rng(seed)
  features = (rng.normal(size=labels.shape + (3,))
              + 2 * rng.normal(size=(labels.max() + 1, 3))[labels]).astype(np.float32)
  # float32 and float64 means differ by ~1e-6: decisions this far apart agree.
  assert _refine_margin(labels, features, 3) > 1e-4
  out = _Device.refine(labels, features, steps=3)
  np.testing.assert_array_equal(out, postprocess_reference.refine(labels, features, steps=3))
  assert not np.array_equal(out, postprocess_reference.relabel(labels))  # it had work to do


def test_cosine_merge_distance_ignores_the_length(postprocess):
  regions = np.repeat(np.arange(3), 2)[None]
  features = np.array([[1.0, 0.0], [5.0, 0.1], [0.0, 1.0]])[regions]
  out = postprocess.merge_regions(regions, features, metric="cosine", num_regions=2)
  assert out[0, 0] == out[0, 2] != out[0, 4]


def test_modal_filter_removes_an_isolated_pixel(postprocess):
  labels = np.zeros((9, 9), np.int32)
  labels[4, 4] = 1
  labels[:, 7:] = 2
  out = postprocess.modal_filter(labels, 3)
  assert out[4, 4] == 0 and (out[:, 8] == 2).all()


# ---------------------------------------------------------------------------
# A whole segmenter, configured as in the defaults.


def _segmenter(name, **overrides):
  segmenter = segmenters.from_config(name, defaults.segmenter(**overrides))
  segmenter.check()
  return segmenter


def test_split_and_merge_separates_two_same_coloured_objects_that_kmeans_joins():
  # A gray background shaded from left to right (as renders are: K0 clusters
  # cut it into bands), two red squares apart, one blue square: 4 true masks.
  image = np.broadcast_to(np.linspace(0.42, 0.58, 48, dtype=np.float32)[None, None, :, None],
                          (1, 32, 48, 3)).copy()
  truth = np.zeros((1, 32, 48), np.int32)
  for slot, (r, c, colour) in enumerate([(4, 4, (1, 0, 0)), (20, 30, (1, 0, 0)),
                                         (4, 30, (0, 0, 1))], start=1):
    image[0, r:r + 8, c:c + 8] = colour
    truth[0, r:r + 8, c:c + 8] = slot
  image += _rng(3).normal(scale=0.002, size=image.shape).astype(np.float32)
  num_masks = jnp.array([4])
  keys = jax.random.key(0)[None]
  km = defaults.base_config().eval.kmeans
  scores = {}
  for seg in (_segmenter("plain", metric="euclidean"),
              _segmenter("merge", pixel_transforms="lab", metric="euclidean", split=True,
                         min_area=5e-3, merge=True),
              _segmenter("predict", pixel_transforms="lab", metric="euclidean", k="predict",
                         num_clusters=6, split=True, min_area=5e-3, merge=True,
                         merge_threshold=0.1)):
    target, threshold = segmenters.merge_rule(seg, segmenters.target_k(seg, num_masks),
                                              "pixels", 11)
    labels, _ = segmenters.segment(seg, km, jnp.asarray(image),
                                   segmenters.cluster_k(seg, num_masks), keys, target,
                                   threshold, is_pixels=True, max_regions=_SLOTS, cap=11)
    labels = np.asarray(labels)
    tables = metrics.contingency_host(truth, labels, 11, 11)
    scores[seg.name] = metrics.score_tables(tables, np.array([4]))
    if seg.predicts_k:
      assert metrics.k_error(tables, np.array([4]), np.array([True])).k_error[0] == 0
  # Colour alone cannot tell the two red squares apart (3 colours, K = 4).
  assert scores["plain"].poster_miou[0] < 0.9
  assert scores["merge"].poster_miou[0] == pytest.approx(1.0)
  assert scores["predict"].poster_miou[0] == pytest.approx(1.0)


def test_bad_segmenter_configs_are_clear_errors():
  with pytest.raises(ValueError, match="unknown field"):
    segmenters.from_config("x", ml_collections.ConfigDict({"metrc": "cosine"}))
  with pytest.raises(ValueError, match="k='predict' needs"):
    _segmenter("x", k="predict")
  with pytest.raises(ValueError, match=r"eval\.segmenters\.x\.metric='manhattan': choose one"):
    _segmenter("x", metric="manhattan")
  with pytest.raises(ValueError, match=r"eval\.segmenters\.x\.fixed_k=0 must be in \[1, inf\)"):
    _segmenter("x", fixed_k=0)
  with pytest.raises(ValueError, match=r"min_area=nan must be a finite number"):
    _segmenter("x", min_area=float("nan"))
  with pytest.raises(ValueError, match=r"border_merge_factor=0.5 must be in \[1, inf\)"):
    _segmenter("x", border_merge_factor=0.5)
  with pytest.raises(ValueError, match=r"refine_steps=-1 must be in \[0, 50\]"):
    _segmenter("x", refine_steps=-1)
  config = defaults.base_config()
  config.eval.segmenter_names = ("kmeans", "nope")
  with pytest.raises(ValueError, match="nope"):
    validate.check_names(config, "baselines")


def test_the_config_entry_and_the_dataclass_are_one_schema():
  # Every field of the dataclass is a config key, at the dataclass's default,
  # and reading the entry back gives the dataclass's defaults.
  entry = defaults.segmenter()
  assert set(entry) == {f.name for f in dataclasses.fields(spec.Segmenter)} - {"name"}
  assert segmenters.from_config("x", entry) == spec.Segmenter(name="x")
  assert set(spec.field_docs()) == set(entry) | {"name"}
  assert all(spec.field_docs().values())
  with pytest.raises(ValueError, match="unknown segmenter field"):
    defaults.segmenter(tap_cut_min_width=5)


def test_a_field_keys_the_programs_it_shapes_and_no_other():
  base = _segmenter("a", split=True, merge=True, merge_source="tap")
  changed = {"cluster": "argmax", "pixel_transforms": ("lab",), "tap_transforms": ("l2",),
             "pca_dim": 3, "xy_weight": 0.5, "metric": "euclidean", "k": "fixed",
             "modal_size": 3, "split": False, "min_area": 1e-3, "merge": False,
             "merge_threshold": 0.2, "tap_merge_threshold": 0.6,
             "colour_merge_threshold": 0.1, "split_source": "pixels",
             "merge_source": "pixels", "taps": ("enc1",), "name": "b",
             "shape_split": True, "shape_split_min_radius": 0.05,
             "shape_split_waist": 0.6, "shape_split_max_area": 0.2,
             "border_merge_factor": 2.0, "refine_steps": 2}
  fields = {f.name: f for f in dataclasses.fields(spec.Segmenter)}
  assert set(changed) == set(fields) - {"fixed_k", "num_clusters"}
  for name, value in changed.items():
    other = dataclasses.replace(base, **{name: value})
    for stage in spec.STAGES:
      assert (other.program(stage) != base.program(stage)) == (
          stage in fields[name].metadata["shapes"]), (name, stage)
  # K and K0 reach the programs only as the label bound k_max.
  for name in ("fixed_k", "num_clusters"):
    assert dataclasses.replace(base, **{name: 5}).program("kmeans") == base.program("kmeans")
    bigger = dataclasses.replace(base, **{name: 16})
    assert bigger.program("kmeans") != base.program("kmeans")
    assert all(bigger.program(stage).k_max == 16 for stage in spec.STAGES)


def test_host_contingency_equals_the_device_one():
  rng = _rng(4)
  true = rng.integers(0, 5, size=(3, 10, 12))
  pred = rng.integers(-1, 8, size=(3, 10, 12))  # -1 and 7 are out of range below
  host = metrics.contingency_host(true, pred, 5, 7)
  device = np.asarray(metrics.contingency(jnp.asarray(true), jnp.asarray(pred), 5, 7))
  np.testing.assert_array_equal(host, device)


def test_segmenter_benchmark_runs_and_the_engine_imports_no_tensorflow(start_python):
  # The GPU machine may lack TensorFlow: the engine and its benchmark may not pull it in.
  code = ("import sys, clevr_jax.evaluation, "
          "benchmarks.segmenter_benchmark; "
          "print(sorted(m for m in sys.modules if m.startswith('tensorflow') "
          "or m.startswith('clevr_jax.data')))")
  # Both children at once: on two cores their start-ups (imports) overlap.
  importing = start_python(["-c", code])
  benchmark = start_python(["-m", "benchmarks.segmenter_benchmark", "--batch=2",
                            "--repeats=1", "--sizes=48x64"])
  imported = importing.result()
  assert imported.returncode == 0, imported.stderr[-2000:]
  assert imported.stdout.strip() == "[]"
  result = benchmark.result()
  assert result.returncode == 0, result.stderr[-2000:]
  rows = {cells[2]: cells for cells in (
      [c.strip() for c in line.split("|")] for line in result.stdout.splitlines()
      if line.startswith("| 48x64 |"))}
  assert set(rows) == set(defaults.base_config().eval.segmenter_names)
  # Without post-processing both columns are the same K-Means labels: equal scores.
  assert rows["kmeans"][7].split(" / ")[0] == rows["kmeans"][7].split(" / ")[1]


def test_hypercolumns_are_scored_after_the_taps_and_need_no_extra_config():
  from clevr_jax.evaluation import model_eval  # pylint: disable=g-import-not-at-top
  config = defaults.base_config()
  config.eval.taps = ("input", "output")
  config.eval.hypercolumns = ("enc1+dec4",)
  needed, scored = model_eval.scored_taps(config)
  assert needed == ("input", "output", "enc1", "dec4")
  assert scored == ("input", "output", "enc1+dec4")
  config.eval.hypercolumns = ("enc1+dec9",)
  with pytest.raises(ValueError, match="dec9"):
    model_eval.scored_taps(config)


def test_learned_taps_merge_under_their_own_threshold():
  # Two regions whose mean features are 0.5 apart: merged under a threshold of
  # 1.0, kept apart under 0.2; pixels use merge_threshold, taps
  # tap_merge_threshold when it is set.
  seg = _segmenter("predict", metric="euclidean", k="predict", num_clusters=2, merge=True,
                   merge_threshold=0.2, tap_merge_threshold=1.0)
  labels = np.zeros((1, 4, 6), np.int32)
  labels[:, :, 3:] = 1
  features = np.zeros((1, 4, 6, 1), np.float32)
  features[:, :, 3:] = 0.5
  counts = {}
  for tap in ("input", "embedding"):
    target, threshold = segmenters.merge_rule(seg, jnp.array([2]), tap, 11)
    out = jax.vmap(functools.partial(
        regions.postprocess, num_labels=2, modal_size=0, split=False, min_area=0,
        max_regions=_SLOTS, cap=11, metric="euclidean"))(
            jnp.asarray(labels), jnp.asarray(features), target, threshold)[0]
    counts[tap] = len(np.unique(np.asarray(out)))
  assert counts == {"input": 2, "embedding": 1}
  assert seg.threshold_for("pixels") == 0.2
  assert dataclasses.replace(seg, tap_merge_threshold=0.0).threshold_for("embedding") == 0.2


# ---------------------------------------------------------------------------
# The device program against its SciPy reference on random cluster maps.


def _blobs(seed, h=24, w=32, k=5):
  """A random cluster map of blobs, specks and thin strands (smoothed noise, argmax)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  noise = np.random.default_rng(seed).normal(size=(k, h, w))
  return ndimage.gaussian_filter(noise, (0, 1.5, 1.5)).argmax(0).astype(np.int32)


@pytest.mark.parametrize("seed", range(6))
def test_device_steps_equal_the_reference_on_random_maps(seed):
  labels = _blobs(seed)
  np.testing.assert_array_equal(_Device.modal_filter(labels, 3),
                                postprocess_reference.modal_filter(labels, 3))
  # Components: the same partition, numbered the same way (cluster, first pixel).
  split = postprocess_reference.split_components(labels)
  np.testing.assert_array_equal(_Device.split_components(labels), split)
  # Absorbing: the same kept regions, numbered alike; the absorbed pixels of a speck
  # may take another neighbour's label (propagation, not the Euclidean nearest).
  absorbed = postprocess_reference.absorb_small(split, 6)
  device, count = _compact(jnp.asarray(labels), num_labels=5, split=True, min_area=6)
  device = np.asarray(device)
  kept = np.bincount(split.ravel())[split] >= 6
  assert int(count) == absorbed.max() + 1
  np.testing.assert_array_equal(device[kept], absorbed[kept])
  assert set(np.unique(device[~kept])) <= set(np.unique(absorbed))
  # Merging: the same order, so the same labels. Region means set well apart
  # (3 sigma) against pixel noise of 1: float32 and float64 means differ by
  # ~1e-6, far below the gaps between competing distances.
  rng = _rng(seed)
  features = (rng.normal(size=absorbed.shape + (3,))
              + 3 * rng.normal(size=(absorbed.max() + 1, 3))[absorbed]).astype(np.float32)
  for metric, threshold in (("euclidean", 1.0), ("cosine", 0.05)):
    for k in (1, 3, 5):
      np.testing.assert_array_equal(
          _Device.merge_regions(absorbed, features, metric=metric, num_regions=k,
                                max_regions=11),
          postprocess_reference.merge_regions(absorbed, features, metric=metric,
                                              num_regions=k, max_regions=11))
    np.testing.assert_array_equal(
        _Device.merge_regions(absorbed, features, metric=metric, threshold=threshold,
                              max_regions=11),
        postprocess_reference.merge_regions(absorbed, features, metric=metric,
                                            threshold=threshold, max_regions=11))


@pytest.mark.parametrize("merge,k,refine_steps", [
    (True, "oracle", 0), (True, "predict", 0), (False, "oracle", 0), (True, "predict", 1)])
def test_whole_postprocessing_equals_the_reference_without_specks(merge, k, refine_steps):
  # Without absorption every step is the same algorithm: equal label maps, image
  # for image, through merge-to-K, merge under a threshold, and the cap alone.
  seg = _segmenter("s", metric="euclidean", k=k, num_clusters=5 if k == "predict" else 0,
                   modal_size=3, split=True, merge=merge, merge_threshold=1.0,
                   refine_steps=refine_steps)
  rng = _rng(7)
  labels = np.stack([_blobs(seed) for seed in (10, 11, 12)])
  refs, feats = [], []
  for image in labels:
    split = postprocess_reference.split_components(
        postprocess_reference.modal_filter(image, 3))
    feats.append(rng.normal(size=image.shape + (3,))
                 + 3 * rng.normal(size=(split.max() + 1, 3))[split])
    if refine_steps:
      assert _refine_margin(split, feats[-1], refine_steps) > 1e-4
  features = np.stack(feats).astype(np.float32)
  for image, x in zip(labels, features):
    refs.append(postprocess_reference.postprocess_one(
        image, x, modal_size=3, split=True, min_area=0, merge=merge, metric="euclidean",
        target=4, threshold=1.0 if k == "predict" else None, max_regions=11,
        refine_steps=refine_steps))
  target, threshold = segmenters.merge_rule(seg, jnp.full(3, 4), "pixels", 11)
  out, counts = jax.vmap(functools.partial(
      regions.postprocess, num_labels=5, modal_size=3, split=True, min_area=0,
      max_regions=64, cap=11, metric="euclidean", refine_steps=refine_steps))(
          jnp.asarray(labels), jnp.asarray(features), target, threshold)
  np.testing.assert_array_equal(np.asarray(out), np.stack(refs))
  assert (np.asarray(counts) > 11).all()  # the cap had work to do


def test_more_regions_than_slots_absorbs_the_smallest_and_warns(caplog):
  # Vertical stripes 1..6 pixels wide, alternately clusters 0 and 1: six
  # components of 8, 16, ..., 48 pixels. With R = 3 slots the three largest
  # stay, numbered in (cluster, first pixel) order; the others are absorbed.
  widths = np.arange(1, 7)
  labels = np.repeat(np.arange(6) % 2, widths)[None].repeat(8, 0).astype(np.int32)
  out, count = _compact(jnp.asarray(labels), num_labels=2, split=True, min_area=0)
  assert int(count) == 6 and len(np.unique(np.asarray(out))) == 6  # R = _SLOTS: all fit
  root = regions.root_map(jnp.asarray(labels), 2, True)
  out, count = regions.compact(jnp.asarray(labels), root, 2, 0, 3)
  out = np.asarray(out)
  assert int(count) == 6
  starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
  kept = [out[0, starts[i]] for i in (3, 4, 5)]  # widths 4, 5, 6 (clusters 1, 0, 1)
  assert kept == [1, 0, 2] and set(np.unique(out)) == {0, 1, 2}
  with caplog.at_level("WARNING"):
    segmenters.check_region_counts(np.array([6, 2]), 3, "tap 'input'")
  assert "1 image(s) of tap 'input'" in caplog.text and "eval.max_regions=3" in caplog.text


def test_segmenters_that_share_a_program_keep_their_own_k_and_merge_rule():
  # kmeans / kmeans_fixed_k, and split_merge / split_merge_predict_k, share a
  # compiled program each (K, the merge's rule and its border factor are inputs):
  # each must still get its own tables, the ones it gets alone.
  from clevr_jax import sharding  # pylint: disable=g-import-not-at-top
  from clevr_jax.evaluation import protocol  # pylint: disable=g-import-not-at-top
  config = defaults.get_config("test")
  config.data.image_height, config.data.image_width = 24, 32
  config.eval.segmenters.split_merge.border_merge_factor = 1.0  # not split_merge_predict_k's
  found = segmenters.configured(config)
  assert len({s.program("kmeans") for s in found}) == 1
  assert found[2].program("postprocess") == found[3].program("postprocess")
  rng = _rng(8)
  mesh = sharding.make_mesh()
  batch = sharding.to_global({
      "instance_labels": np.repeat(np.repeat(rng.integers(0, 4, (2, 6, 8)), 4, 1), 4, 2
                                   ).astype(np.int32),
      "num_masks": np.array([4, 4], np.int32), "index": np.arange(2, dtype=np.int32),
      "features": rng.random((2, 24, 32, 3)).astype(np.float32)}, mesh)
  features = batch["features"]
  keys = kmeans.image_keys(0, batch["index"])
  together = protocol.Runner(config, mesh, found)
  valid = np.ones(2, bool)
  for seg in found:
    alone = protocol.Runner(config, mesh, [seg])
    np.testing.assert_array_equal(
        together.collect(seg, "input", together.dispatch(seg, "input", features, batch, keys),
                         valid),
        alone.collect(seg, "input", alone.dispatch(seg, "input", features, batch, keys), valid))
  tables = {s.name: together.collect(s, "input", together.dispatch(s, "input", features,
                                                                   batch, keys), valid)
            for s in found}
  # K = 11 (fixed) leaves more labels in use than the oracle K = 4.
  assert (tables["kmeans_fixed_k"].sum(1) > 0).sum() > (tables["kmeans"].sum(1) > 0).sum()
  # The four share one K-Means program (cosine and euclidean alike: the metric is
  # an input); the post-processing is one more, the scoring of plain K-Means one.
  kinds = [key[0] for key in together.programs.keys]
  assert kinds.count("kmeans") == 1 and kinds.count("postprocess") == 1
  # Staged, the segmenter computes what `segment` computes as one program.
  host = {k: np.asarray(v) for k, v in batch.items()}
  for seg in found:
    num_masks = host["num_masks"]
    target, threshold = segmenters.merge_rule(seg, segmenters.target_k(seg, num_masks),
                                              "input", together.slots)
    labels, _ = jax.jit(lambda f, k, t, th, seg=seg: segmenters.segment(
        seg, config.eval.kmeans, f, k, kmeans.image_keys(0, host["index"]), t, th,
        is_pixels=True, max_regions=config.eval.max_regions, cap=together.slots))(
            host["features"], segmenters.cluster_k(seg, num_masks), target, threshold)
    staged = together.dispatch(seg, "input", features, batch, keys)[1]
    np.testing.assert_array_equal(
        np.asarray(staged), np.asarray(kmeans.upsample_labels(labels, 24, 32)))
