"""tools/render_clevr.py: Blender renders written as official clevr_with_masks records.

The end-to-end test needs Blender and the CLEVR generator's assets (their
folder in $CLEVR_ASSETS_DIR, or the cache folder the docs name) and is skipped
without them; the checks of the written records run everywhere.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import pytest

from clevr_jax import schema
from clevr_jax.data import official
from tools import render_clevr

_ASSETS = pathlib.Path(os.environ.get(
    "CLEVR_ASSETS_DIR",
    pathlib.Path.home() / ".cache/clevr_jax/clevr-dataset-gen/image_generation/data"))


def _scene(bounds):
  return {"index": 7, "objects": [
      {"shape": "cube", "material": "metal", "size": "large", "color": "red",
       "x": 1.0, "y": -2.0, "z": 0.5, "rotation": 30.0,
       "pixel_coords": [5.0, 4.0, 9.0], "bounds": bounds}]}


def _labels():
  labels = np.zeros((8, 12), np.uint8)
  labels[2:6, 3:8] = 1  # 20 pixels, columns 3-7, rows 2-5
  return labels


def test_records_round_trip_with_codes_and_a_partition():
  labels = _labels()
  image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
  example = render_clevr.to_official(image, labels, _scene([3.0, 2.0, 8.0, 6.0]))
  parsed = official.parse_record(official.serialize_record(example), 8, 12)
  np.testing.assert_array_equal(schema.masks_to_labels(parsed["mask"].numpy()), labels)
  np.testing.assert_array_equal(parsed["image"].numpy(), image)
  assert parsed["visibility"].numpy().tolist() == [1.0, 1.0] + [0.0] * 9
  assert schema.SHAPES[int(parsed["shape"].numpy()[1])] == "cube"
  assert schema.COLORS[int(parsed["color"].numpy()[1])][0] == "red"
  assert schema.MATERIALS[int(parsed["material"].numpy()[1])] == "metal"
  assert parsed["pixel_coords"].numpy()[1].tolist() == [5.0, 4.0, 9.0]


def test_a_mask_outside_its_projected_box_is_refused():
  render_clevr.check_scene(_labels(), _scene([3.0, 2.0, 8.0, 6.0]), min_visible_pixels=20)
  with pytest.raises(render_clevr.RenderError, match="outside its projected"):
    render_clevr.check_scene(_labels(), _scene([6.0, 2.0, 8.0, 6.0]), min_visible_pixels=1)
  with pytest.raises(render_clevr.RenderError, match="fewer than 21"):
    render_clevr.check_scene(_labels(), _scene([3.0, 2.0, 8.0, 6.0]), min_visible_pixels=21)


def test_missing_assets_name_what_to_fetch(tmp_path):
  with pytest.raises(render_clevr.RenderError, match="clevr-dataset-gen"):
    render_clevr.check_assets(str(tmp_path))


@pytest.mark.slow  # starts Blender
@pytest.mark.skipif(shutil.which("blender") is None, reason="Blender is not installed")
@pytest.mark.skipif(not (_ASSETS / "base_scene.blend").exists(),
                    reason="the CLEVR generator's assets are absent (set CLEVR_ASSETS_DIR)")
def test_blender_scene_has_masks_that_partition_the_image(tmp_path):
  height, width = 48, 64
  values = {"assets_dir": str(_ASSETS), "out": str(tmp_path / "tiny.tfrecord"),
            "seed": 3, "num_scenes": 1, "min_objects": 2, "max_objects": 3,
            "samples": 2, "threads": 0, "processes": 1, "height": height,
            "width": width, "min_visible_pixels": 8, "blender": "blender"}
  out = render_clevr.run(values)
  records = list(official.read_records(str(out), height=height, width=width))
  assert len(records) == 1
  _, example = records[0]
  labels = schema.masks_to_labels(example["mask"])  # raises unless a partition
  objects = int(example["visibility"].sum()) - 1
  assert 2 <= objects <= 3
  assert sorted(np.unique(labels).tolist()) == list(range(objects + 1))
  assert example["image"].std() > 0  # a render, not an empty frame

  # A second run finds the scene finished and writes the same record.
  part = out.with_name(out.name + ".parts") / "scene_000000.png"
  stamp = part.stat().st_mtime_ns
  first = out.read_bytes()
  render_clevr.run(values)
  assert part.stat().st_mtime_ns == stamp
  assert out.read_bytes() == first


def test_scene_stats_read_a_drawn_shadow_and_clean_floor():
  from tools import compare_renders  # pylint: disable=import-outside-toplevel
  labels = np.zeros((240, 320), np.uint8)
  labels[100:140, 100:140] = 1
  image = np.full((240, 320, 3), 128, np.uint8)
  image[100:140, 100:140] = (200, 30, 30)
  image[100:140, 140:150] = 64  # a hard shadow, half the floor's level, right of the object
  stats = compare_renders.scene_stats(image, labels)
  assert stats["background"] == pytest.approx(1 - 1600 / 76800)
  assert stats["object_area"] == [pytest.approx(1600 / 76800)]
  assert stats["shadow_depth"] == pytest.approx(0.5, abs=0.01)
  assert stats["penumbra"] == 0.0  # all of it below the core level
  assert 0.0 < stats["shadow_area"] < 0.5
  assert stats["noise"] == pytest.approx(0.0, abs=1e-9)
  assert stats["floor_gradient"] == pytest.approx(0.0, abs=1e-9)


def test_sweep_varies_one_setting_at_a_time_or_all():
  from tools import segmenter_sweep  # pylint: disable=import-outside-toplevel
  vary = segmenter_sweep.parse_vary("min_area=5e-4,1e-3;modal_size=0")
  assert vary == {"min_area": [5e-4, 1e-3], "modal_size": [0]}
  base = {"min_area": 1e-3, "modal_size": 3, "merge_threshold": 0.2}
  one = segmenter_sweep.variants(base, vary, grid=False)
  assert one == [base, dict(base, min_area=5e-4), dict(base, modal_size=0)]
  # Every combination, the base's own (1e-3, 3) once.
  grid = segmenter_sweep.variants(base, dict(vary, modal_size=[0, 3]), grid=True)
  assert len(grid) == 4 and grid[0] == base


def test_sweep_reads_a_configs_file_and_links_a_runs_checkpoints(tmp_path):
  from tools import segmenter_sweep  # pylint: disable=import-outside-toplevel
  config = segmenter_sweep.load_config("configs/unet_objects.py:quick")
  assert config.preset == "quick" and "hybrid_predict_k" in config.eval.segmenters
  for bad in ("configs/no_such_config.py", "clevr_jax/defaults.py", "configs/unet_rgb.py:big"):
    with pytest.raises(ValueError, match="--config"):
      segmenter_sweep.load_config(bad)
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  workdir = segmenter_sweep._linked_workdir(str(tmp_path / "w"), str(run))
  assert (pathlib.Path(workdir) / "checkpoints").resolve() == (run / "checkpoints").resolve()
  # Linking again is a no-op; a real folder in the way is an error, not overwritten.
  segmenter_sweep._linked_workdir(workdir, str(run))
  (tmp_path / "x" / "checkpoints").mkdir(parents=True)
  with pytest.raises(SystemExit, match="error:"):
    segmenter_sweep._linked_workdir(str(tmp_path / "x"), str(run))


def test_compare_renders_scene_settings_are_number_or_switch_fields():
  from tools import compare_renders  # pylint: disable=import-outside-toplevel
  config = compare_renders.scene_config("cube_scale=0.7071, shadow_samples=2,metal=false")
  assert (config.cube_scale, config.shadow_samples, config.metal) == (0.7071, 2, False)
  assert compare_renders.scene_config("") == compare_renders.renderer.SceneConfig()
  for bad in ("lights=1", "no_such_field=1", "cube_scale", "shadow_samples=two"):
    with pytest.raises(ValueError, match="--scene"):
      compare_renders.scene_config(bad)
