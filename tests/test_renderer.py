"""Tests of clevr_jax.data.renderer: record, geometry, determinism, look."""

import dataclasses
import functools
import itertools
import math

import numpy as np
import pytest

from clevr_jax import schema
from clevr_jax.data import renderer

SMALL = renderer.SceneConfig(height=60, width=80)
SMALL_SEEDS = range(40)


@functools.lru_cache(maxsize=None)
def _small_scene(seed: int) -> dict[str, np.ndarray]:
  return renderer.render_scene(seed, SMALL)


@functools.lru_cache(maxsize=None)
def _full_scenes() -> tuple[dict[str, np.ndarray], ...]:
  return tuple(renderer.render_scene(seed) for seed in range(12))


def _objects(scene) -> int:
  return int(scene["visibility"].sum()) - 1


def _footprint_radius(scene, slot: int) -> float:
  """The circumradius of an object's footprint on the floor, from its codes."""
  radius = renderer.SIZE_RADII[int(scene["size"][slot])]
  return radius * (math.sqrt(2) if scene["shape"][slot] == renderer.CUBE else 1)


def test_record_has_the_real_schema():
  scene = _small_scene(0)
  expected = {"image": ((60, 80, 3), np.uint8), "labels": ((60, 80), np.uint8),
              "pixel_coords": ((schema.MAX_SLOTS, 3), np.float32)}
  expected.update({name: ((schema.MAX_SLOTS,), np.float32)
                   for name in schema.FLOAT_FEATURES})
  expected.update({name: ((schema.MAX_SLOTS,), np.uint8)
                   for name in schema.CODE_FEATURES})
  actual = {name: (value.shape, value.dtype) for name, value in scene.items()}
  assert actual == expected


def test_same_seed_same_scene_other_seed_other_scene():
  first, again = renderer.render_scene(7, SMALL), renderer.render_scene(7, SMALL)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name], err_msg=name)
  other = renderer.render_scene(8, SMALL)
  assert not np.array_equal(first["image"], other["image"])
  assert not np.array_equal(first["x"], other["x"])


def test_toy_scenes_have_distinct_colours_and_no_metal():
  # Eight colours, at most eight objects: with the default draws nearly every
  # scene of 5-8 objects repeats a colour (1 - 8!/(3! 8^5) ~ 0.79 at five).
  toy = renderer.SceneConfig(height=60, width=80, min_objects=5, max_objects=8,
                             distinct_colors=True, metal=False)
  clevr = dataclasses.replace(toy, distinct_colors=False, metal=True)
  repeats = 0
  for seed in range(12):
    scene = renderer.render_scene(seed, toy)
    objects = slice(1, _objects(scene) + 1)
    colours = scene["color"][objects].tolist()
    assert len(set(colours)) == len(colours), seed
    assert set(scene["material"][objects].tolist()) == {renderer.RUBBER}, seed
    plain = renderer.render_scene(seed, clevr)["color"]
    repeats += len(set(plain[plain > 0].tolist())) < int((plain > 0).sum())
  assert repeats >= 6  # the default scenes do repeat colours: the switch did the work
  with pytest.raises(ValueError, match="distinct colours"):
    renderer.SceneConfig(max_objects=len(schema.COLORS) + 1, distinct_colors=True)


def test_cube_scale_sets_the_cubes_half_side_and_no_other_shapes_size():
  generator = dataclasses.replace(SMALL, cube_scale=1 / math.sqrt(2))
  cubes = 0
  for seed in range(6):
    scene = renderer.render_scene(seed, generator)
    objects = slice(1, _objects(scene) + 1)
    radius = np.array([renderer.SIZE_RADII[s] for s in scene["size"][objects]])
    cube = scene["shape"][objects] == renderer.CUBE
    np.testing.assert_allclose(scene["z"][objects], np.where(cube, radius / math.sqrt(2), radius),
                               rtol=1e-6)
    cubes += int(cube.sum())
  assert cubes >= 3  # the scenes held cubes to scale
  with pytest.raises(ValueError, match="cube_scale"):
    renderer.SceneConfig(cube_scale=0.0)


MEDIUM = renderer.SceneConfig(height=120, width=160)


def _far_from_objects(labels: np.ndarray, pixels: int) -> np.ndarray:
  """Floor pixels more than `pixels` (chessboard distance) from every object."""
  near = labels > 0
  for _ in range(pixels):
    grown = near.copy()
    grown[1:] |= near[:-1]
    grown[:-1] |= near[1:]
    grown[:, 1:] |= near[:, :-1]
    grown[:, :-1] |= near[:, 1:]
    near = grown
  return ~near


def _shading_change(changed: renderer.SceneConfig, seeds=range(4)):
  """(new image - base image) as ints and the labels, per seed, MEDIUM as the base."""
  for seed in seeds:
    base, other = renderer.render_scene(seed, MEDIUM), renderer.render_scene(seed, changed)
    np.testing.assert_array_equal(base["labels"], other["labels"])  # the geometry stays
    yield other["image"].astype(int) - base["image"], base["labels"]


def test_shadows_of_the_fill_and_back_lamps_only_darken():
  # More lamps casting shadows can only take light away; they darken some floor
  # beside the objects, and most of the open floor sees all three lamps.
  deepest, unchanged = 0, []
  for change, labels in _shading_change(dataclasses.replace(MEDIUM, shadow_lights=3)):
    assert change.max() <= 0
    deepest = max(deepest, -change[labels == 0].min())
    unchanged.append((change[_far_from_objects(labels, 12)] == 0).all(axis=-1).mean())
  assert deepest >= 20  # grey levels: a lamp's shadow, not rounding
  assert np.mean(unchanged) > 0.5


def test_the_sun_shadows_the_floor_beside_objects_and_keeps_the_open_floor():
  # All the ambient as the sun: its short shadows darken floor next to objects.
  # Farther off the floor is as bright as before where no object was near, and
  # a little brighter where the ambient occlusion of objects reached (the
  # sun's share has none): never darker.
  darkest, unchanged = 0, []
  for change, labels in _shading_change(dataclasses.replace(MEDIUM, sun_share=1.0)):
    darkest = max(darkest, -change[labels == 0].min())
    open_floor = change[_far_from_objects(labels, 20)]
    assert open_floor.min() >= 0
    unchanged.append((open_floor == 0).all(axis=-1).mean())
  assert darkest >= 20
  assert np.mean(unchanged) > 0.3


def test_contact_occlusion_darkens_the_floor_at_objects_and_nothing_far():
  contact = dataclasses.replace(MEDIUM, contact_occlusion=0.5, contact_reach=0.05)
  darkest = 0
  for change, labels in _shading_change(contact):
    assert change.max() <= 0
    darkest = max(darkest, -change[labels == 0].min())
    # The line is thin: 8 reaches (0.4 scene units) are about 5-10 pixels here.
    assert (change[_far_from_objects(labels, 10)] == 0).all(axis=-1).mean() > 0.95
  assert darkest >= 20


@pytest.mark.parametrize("bad, field", [
    (dict(shadow_lights=0), "shadow_lights"), (dict(shadow_lights=4), "shadow_lights"),
    (dict(sun_share=1.5), "sun_share"), (dict(sun_position=(1.0, 0.0, -1.0)), "sun_position"),
    (dict(contact_occlusion=-0.1), "contact_occlusion"),
    (dict(contact_reach=0.0), "contact_reach")])
def test_shadow_settings_out_of_range_are_refused(bad, field):
  with pytest.raises(ValueError, match=field):
    renderer.SceneConfig(**bad)


def test_zoom_enlarges_every_object_and_keeps_the_scene_in_view():
  # Focal length x2 and the placement area's side / 2: an object at the same
  # depth covers 4x the pixels; objects nearer the origin are a little farther
  # from the camera, so the mean area grows by a little less. The renderer's
  # visibility rule keeps every placed object in view at both settings.
  def mean_object_area(config):
    areas = []
    for seed in range(6):
      scene = renderer.render_scene(seed, config)
      areas += [int((scene["labels"] == slot).sum()) for slot in range(1, _objects(scene) + 1)]
    return np.mean(areas)
  # A floor a quarter the area holds the toy scenes' counts of objects.
  few = dataclasses.replace(SMALL, min_objects=2, max_objects=4)
  ratio = mean_object_area(dataclasses.replace(few, zoom=2.0)) / mean_object_area(few)
  assert 2.5 < ratio < 5.0
  with pytest.raises(ValueError, match="zoom"):
    renderer.SceneConfig(zoom=0.0)


def test_a_plain_floor_is_one_colour_and_the_shaded_one_is_not():
  # Floor pixels away from the objects' edges (which are blended with their
  # neighbours) are one colour on a plain floor; the shaded floor's gradient
  # and shadows spread its pixels over many values.
  plain = dataclasses.replace(SMALL, plain_floor=True)
  for seed in range(3):
    labels = _small_scene(seed)["labels"]
    interior = np.ones_like(labels, bool)
    for dr, dc in itertools.product((-1, 0, 1), repeat=2):
      interior &= np.roll(labels, (dr, dc), axis=(0, 1)) == 0
    scene = renderer.render_scene(seed, plain)
    np.testing.assert_array_equal(scene["labels"], labels)
    floor = scene["image"][interior]
    assert len(np.unique(floor, axis=0)) == 1, seed
    assert len(np.unique(_small_scene(seed)["image"][interior], axis=0)) > 20, seed


@pytest.mark.parametrize("seed", SMALL_SEEDS)
def test_labels_are_0_to_n_and_every_object_is_visible_enough(seed):
  scene = _small_scene(seed)
  count = _objects(scene)
  pixels = np.bincount(scene["labels"].ravel())
  assert len(pixels) == count + 1  # no label beyond the last object
  assert pixels[0] > 0
  assert pixels[1:].min() >= SMALL.visible_pixel_threshold
  # The official one-mask-per-slot form of the labels is a partition.
  masks = schema.labels_to_masks(scene["labels"])
  np.testing.assert_array_equal(schema.masks_to_labels(masks), scene["labels"])


@pytest.mark.parametrize("seed", SMALL_SEEDS)
def test_slot_conventions(seed):
  scene = _small_scene(seed)
  count = _objects(scene)
  objects = slice(1, count + 1)
  empty = slice(count + 1, None)
  np.testing.assert_array_equal(scene["visibility"][:count + 1], 1)
  for name in schema.FLOAT_FEATURES + schema.CODE_FEATURES + ("pixel_coords",):
    assert not scene[name][empty].any(), name
    if name != "visibility":
      assert not scene[name][0].any(), name  # the background has no attributes
  assert set(scene["shape"][objects]) <= set(schema.SHAPES)
  assert set(scene["material"][objects]) <= set(schema.MATERIALS)
  assert set(scene["size"][objects]) <= set(schema.SIZES)
  assert set(scene["color"][objects]) <= set(schema.COLORS)
  assert np.all(np.abs(scene["x"][objects]) <= 3)
  assert np.all(np.abs(scene["y"][objects]) <= 3)
  rotation = scene["rotation"][objects]
  assert np.all((rotation >= 0) & (rotation < 360))
  # z is the centre height: the radius, which is a cube's half side too.
  radii = [renderer.SIZE_RADII[int(size)] for size in scene["size"][objects]]
  np.testing.assert_allclose(scene["z"][objects], radii, rtol=1e-6)


def test_object_counts_stay_in_range_and_reach_both_ends():
  config = renderer.SceneConfig(height=60, width=80, min_objects=2, max_objects=4)
  counts = [_objects(renderer.render_scene(seed, config)) for seed in range(30)]
  assert min(counts) == 2 and max(counts) == 4
  assert all(3 <= _objects(_small_scene(seed)) <= 10 for seed in SMALL_SEEDS)


@pytest.mark.parametrize("seed", SMALL_SEEDS)
def test_objects_do_not_interpenetrate(seed):
  scene = _small_scene(seed)
  for i, j in itertools.combinations(range(1, _objects(scene) + 1), 2):
    distance = math.hypot(scene["x"][i] - scene["x"][j],
                          scene["y"][i] - scene["y"][j])
    reach = (_footprint_radius(scene, i) + _footprint_radius(scene, j)
             + SMALL.min_gap)
    assert distance >= reach - 1e-5, (i, j)


def test_pixel_coords_project_each_centre_onto_its_object():
  own, total = 0, 0
  for seed in SMALL_SEEDS:
    scene = _small_scene(seed)
    for slot in range(1, _objects(scene) + 1):
      col, row, depth = scene["pixel_coords"][slot]
      assert 0 <= col < SMALL.width and 0 <= row < SMALL.height, (seed, slot)
      assert depth > 0
      label = scene["labels"][int(row), int(col)]
      # The centre lies inside its object, so the ray through it hits this
      # object or one in front of it: never the floor.
      assert label != 0, (seed, slot)
      own += label == slot
      total += 1
  assert own / total > 0.8  # occlusion of the very centre is the exception


@pytest.mark.slow  # two worker processes
def test_render_scenes_in_two_processes_equals_render_scene():
  seeds = [3, 1, 4, 1, 5]
  scenes = list(renderer.render_scenes(seeds, SMALL, processes=2))
  assert len(scenes) == len(seeds)
  for seed, scene in zip(seeds, scenes):
    expected = _small_scene(seed)
    for name in expected:
      np.testing.assert_array_equal(scene[name], expected[name], err_msg=name)


def test_render_scenes_in_process_keeps_order():
  scenes = list(renderer.render_scenes([5, 2], SMALL, processes=1))
  np.testing.assert_array_equal(scenes[0]["image"], _small_scene(5)["image"])
  np.testing.assert_array_equal(scenes[1]["image"], _small_scene(2)["image"])


def test_look_like_clevr_at_full_size():
  """Background share and tone as in real clevr_with_masks samples.

  The two real samples have background fractions 0.839 and 0.900 and a gray
  mean background near (123, 123, 122); 200 synthetic scenes average 0.875
  (min 0.73, max 0.99). A dozen scenes must average within [0.80, 0.93].
  """
  scenes = _full_scenes()
  fractions = [(scene["labels"] == 0).mean() for scene in scenes]
  assert 0.80 <= np.mean(fractions) <= 0.93
  assert all(0.6 <= fraction < 1 for fraction in fractions)
  colours = np.array([scene["image"][scene["labels"] == 0].mean(axis=0)
                      for scene in scenes])
  mean_colour = colours.mean(axis=0)
  assert np.all((mean_colour > 110) & (mean_colour < 140))
  assert np.ptp(mean_colour) < 8  # gray
  # The floor fades with distance: the far (top) rows are darker.
  top = np.mean([scene["image"][:24].mean() for scene in scenes])
  bottom = np.mean([scene["image"][-24:].mean() for scene in scenes])
  assert bottom - top > 15


def test_visible_pixel_threshold_scales_clevr_rule_by_area():
  assert renderer.SceneConfig().visible_pixel_threshold == 100  # 200 at 480x320
  assert SMALL.visible_pixel_threshold == 7  # 6.25 rounded up
  assert renderer.SceneConfig(min_visible_pixels=30).visible_pixel_threshold == 30


@pytest.mark.parametrize("bad", [dict(max_objects=schema.MAX_OBJECTS + 1),
                                 dict(min_objects=5, max_objects=4),
                                 dict(min_visible_pixels=0)])
def test_config_rejects_impossible_settings(bad):
  with pytest.raises(ValueError):
    renderer.SceneConfig(**bad)


@np.errstate(divide="ignore", invalid="ignore")  # axis-parallel rays divide by 0
def test_intersections_hit_where_geometry_says():
  f32 = np.float32
  down = (np.array([0.0], f32), np.array([0.0], f32), np.array([-1.0], f32))
  origin = (f32(0.2), f32(0.1), f32(5.0))
  # Sphere of radius 1 centred at height 1: hit at z = 1 + sqrt(1 - 0.05).
  t = renderer._hit_sphere(0, 0, 1, 1, *origin, *down)
  np.testing.assert_allclose(5 - t, 1 + math.sqrt(1 - 0.05), rtol=1e-5)
  # Cylinder of radius 1 and height 2, seen from above: its cap at z = 2.
  t = renderer._hit_cylinder(0, 0, 1, 2, *origin, *down)
  np.testing.assert_allclose(t, 3, rtol=1e-6)
  # A horizontal ray meets the cylinder's side at x = -sqrt(1 - 0.01).
  side = renderer._hit_cylinder(0, 0, 1, 2, f32(-5), f32(0.1), f32(1),
                                f32(1), f32(0), f32(0))
  np.testing.assert_allclose(-5 + side, -math.sqrt(1 - 0.01), rtol=1e-5)
  # A cube of half side 1 turned 45 degrees: its edge reaches sqrt(2) on x.
  cos = sin = math.sqrt(0.5)
  t = renderer._hit_box(0, 0, 1, 1, cos, sin, f32(-5), f32(0), f32(1),
                        f32(1), f32(0), f32(0))
  np.testing.assert_allclose(-5 + t, -math.sqrt(2), rtol=1e-5)
  # Rays that pass by miss.
  assert np.isinf(renderer._hit_sphere(0, 0, 1, 1, f32(3), f32(0), f32(5),
                                       *down))
