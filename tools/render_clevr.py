"""CLEVR scenes rendered by Blender's Cycles from the official generator's assets.

  python -m tools.render_clevr --assets_dir=DATA --out=FILE.tfrecord \
      --seed=0 --num_scenes=300 --min_objects=3 --max_objects=10

DATA is `image_generation/data` of facebookresearch/clevr-dataset-gen
(base_scene.blend, shapes/, materials/, properties.json; not shipped here:
docs/reference/real_asset_renders.md says how to get them). Blender (3.x,
`apt-get install blender`) runs headless on the CPU.

The output is one GZIP TFRecord in DeepMind's `clevr_with_masks` format (the
11-slot schema, 240x320 by default), readable with
`--config.data.eval_file=FILE.tfrecord`. Scene i of seed s is the same on every
run (its layout comes from a stream seeded by (s, i) alone). Finished scenes
are kept in FILE.tfrecord.parts/, so a restarted run renders only the missing
ones; the TFRecord is written from the parts once all are there.

Masks come from Cycles' object-index pass (one sample through each pixel
centre), so they partition the image by construction; each is checked against
its object's projected bounding box before it is written.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from clevr_jax import schema

_BLENDER_SCRIPT = pathlib.Path(__file__).resolve().with_name("clevr_blender_scene.py")
_ASSET_FILES = ("base_scene.blend", "properties.json", "shapes", "materials")


# The CLEVR generator's layout rules and jitters (its defaults).
LAYOUT = {
    "min_dist": 0.25,  # least gap between two objects' bounding circles
    "margin": 0.4,  # least offset along the camera's left/right/front/behind
    "max_retries": 50,  # tries to place one object before the layout restarts
    "max_layouts": 200,  # layouts drawn before a scene is given up
    "camera_jitter": 0.5,
    "light_jitter": 1.0,
}
# Mask pixels may lie this far (pixels) outside the object's projected bounding
# box: the index pass samples pixel centres, the box is exact.
BOUNDS_SLACK = 1.0


class RenderError(RuntimeError):
  """Something a user must fix: the message says what."""


def check_assets(assets_dir: str) -> pathlib.Path:
  folder = pathlib.Path(assets_dir).expanduser()
  missing = [name for name in _ASSET_FILES if not (folder / name).exists()]
  if missing:
    raise RenderError(
        f"--assets_dir={assets_dir} lacks {', '.join(missing)}: point it at "
        "image_generation/data of github.com/facebookresearch/clevr-dataset-gen "
        "(docs/reference/real_asset_renders.md)")
  return folder


def check_blender(blender: str) -> str:
  path = shutil.which(blender)
  if path is None:
    raise RenderError(f"no Blender executable {blender!r}: install it "
                      "(`apt-get install blender`) or pass --blender=PATH")
  return path


def settings(flags_values: dict) -> dict:
  """Everything that decides the pixels of scene i (stored beside the parts)."""
  return {"seed": flags_values["seed"], "min_objects": flags_values["min_objects"],
          "max_objects": flags_values["max_objects"], "samples": flags_values["samples"],
          "height": flags_values["height"], "width": flags_values["width"],
          "min_visible_pixels": flags_values["min_visible_pixels"], **LAYOUT}


def finished(parts: pathlib.Path, num_scenes: int) -> set[int]:
  return {i for i in range(num_scenes) if (parts / f"scene_{i:06d}.json").exists()}


def _start_parts(parts: pathlib.Path, wanted: dict) -> None:
  """Creates the parts folder, or checks that its scenes were made with these settings."""
  parts.mkdir(parents=True, exist_ok=True)
  stored = parts / "settings.json"
  if stored.exists():
    have = json.loads(stored.read_text())
    if have != wanted:
      differ = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
      raise RenderError(
          f"{parts} holds scenes rendered with other settings ({', '.join(differ)}): "
          "give another --out, or delete that folder to start again")
  else:
    stored.write_text(json.dumps(wanted, indent=1))


def render_missing(parts: pathlib.Path, assets: pathlib.Path, missing: list[int],
                   wanted: dict, blender: str, processes: int, threads: int) -> None:
  """Runs Blender on the missing scenes, `processes` at a time, and waits."""
  processes = max(1, min(processes, len(missing)))
  running = []
  for p in range(processes):
    job = dict(wanted, assets_dir=str(assets), parts_dir=str(parts),
               indices=missing[p::processes], threads=threads)
    job_path = parts / f"job_{p}.json"
    job_path.write_text(json.dumps(job))
    log = open(parts / f"blender_{p}.log", "w")  # pylint: disable=consider-using-with
    command = [blender, "--background", "--factory-startup", "--python",
               str(_BLENDER_SCRIPT), "--", str(job_path)]
    running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
  total = len(missing)
  start = time.monotonic()
  last = -1
  while any(proc.poll() is None for proc, _ in running):
    time.sleep(5)
    done = sum((parts / f"scene_{i:06d}.json").exists() for i in missing)
    if done != last:
      per_scene = (time.monotonic() - start) / done if done else float("nan")
      print(f"render_clevr: {done}/{total} scenes, {per_scene:.1f} s a scene", flush=True)
      last = done
  for p, (proc, log) in enumerate(running):
    log.close()
    if proc.returncode != 0:
      tail = (parts / f"blender_{p}.log").read_text().splitlines()[-5:]
      raise RenderError(f"Blender exited with {proc.returncode} (log: "
                        f"{parts / f'blender_{p}.log'}); its last lines:\n  "
                        + "\n  ".join(tail))


def _codes(table: dict[int, object]) -> dict[str, int]:
  return {(v[0] if isinstance(v, tuple) else v): k for k, v in table.items()}


_SHAPE_CODES = _codes(schema.SHAPES)
_MATERIAL_CODES = _codes(schema.MATERIALS)
_SIZE_CODES = _codes(schema.SIZES)
_COLOR_CODES = _codes(schema.COLORS)


def check_scene(labels: np.ndarray, scene: dict, min_visible_pixels: int) -> None:
  """Masks at their objects: each object's pixels lie in its projected box, enough of them."""
  objects = scene["objects"]
  if labels.max() > len(objects):
    raise RenderError(f"scene {scene['index']}: label {labels.max()} but "
                      f"{len(objects)} objects")
  for slot, obj in enumerate(objects, start=1):
    rows, cols = np.nonzero(labels == slot)
    if rows.size < min_visible_pixels:
      raise RenderError(f"scene {scene['index']}: object {slot} shows {rows.size} "
                        f"pixels, fewer than {min_visible_pixels}")
    col0, row0, col1, row1 = obj["bounds"]
    # Pixel (r, c) covers [c, c+1) x [r, r+1); its sample is at the centre.
    outside = ((cols + 0.5 < col0 - BOUNDS_SLACK) | (cols + 0.5 > col1 + BOUNDS_SLACK)
               | (rows + 0.5 < row0 - BOUNDS_SLACK) | (rows + 0.5 > row1 + BOUNDS_SLACK))
    if outside.any():
      raise RenderError(f"scene {scene['index']}: {int(outside.sum())} pixels of object "
                        f"{slot}'s mask lie outside its projected bounding box")


def to_official(image: np.ndarray, labels: np.ndarray, scene: dict) -> dict[str, np.ndarray]:
  """One rendered scene -> the official clevr_with_masks arrays (11 slots)."""
  s = schema.MAX_SLOTS
  example = {"image": image, "mask": schema.labels_to_masks(labels, s),
             "pixel_coords": np.zeros((s, 3), np.float32)}
  for name in schema.FLOAT_FEATURES:
    example[name] = np.zeros(s, np.float32)
  for name in schema.CODE_FEATURES:
    example[name] = np.zeros(s, np.uint8)
  example["visibility"][0] = 1.0  # slot 0: the background
  for slot, obj in enumerate(scene["objects"], start=1):
    example["pixel_coords"][slot] = obj["pixel_coords"]
    example["x"][slot], example["y"][slot], example["z"][slot] = obj["x"], obj["y"], obj["z"]
    example["rotation"][slot] = obj["rotation"]
    example["visibility"][slot] = 1.0
    example["shape"][slot] = _SHAPE_CODES[obj["shape"]]
    example["material"][slot] = _MATERIAL_CODES[obj["material"]]
    example["size"][slot] = _SIZE_CODES[obj["size"]]
    example["color"][slot] = _COLOR_CODES[obj["color"]]
  return example


def load_scene(parts: pathlib.Path, index: int, height: int, width: int,
               min_visible_pixels: int) -> dict[str, np.ndarray]:
  stem = parts / f"scene_{index:06d}"
  scene = json.loads(stem.with_suffix(".json").read_text())
  image = np.asarray(Image.open(stem.with_suffix(".png")).convert("RGB"))
  labels = np.frombuffer(stem.with_suffix(".labels").read_bytes(), np.uint8)
  if image.shape != (height, width, 3) or labels.size != height * width:
    raise RenderError(f"{stem}: image {image.shape} or labels ({labels.size}) are not "
                      f"{height}x{width}: delete the scene's files to render it again")
  labels = labels.reshape(height, width)
  check_scene(labels, scene, min_visible_pixels)
  return to_official(image, labels, scene)


def write_tfrecord(out: pathlib.Path, parts: pathlib.Path, num_scenes: int,
                   height: int, width: int, min_visible_pixels: int) -> None:
  from clevr_jax.data import official  # pylint: disable=import-outside-toplevel  (TensorFlow)
  tmp = out.with_name(out.name + ".tmp")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  with tf.io.TFRecordWriter(str(tmp), options="GZIP") as writer:
    for index in range(num_scenes):
      writer.write(official.serialize_record(
          load_scene(parts, index, height, width, min_visible_pixels)))
  os.replace(tmp, out)


def run(values: dict) -> pathlib.Path:
  """Renders what is missing and writes the TFRecord; returns its path."""
  if not values["assets_dir"] or not values["out"]:
    raise RenderError("--assets_dir and --out are required")
  if not 1 <= values["min_objects"] <= values["max_objects"] <= schema.MAX_OBJECTS:
    raise RenderError(f"need 1 <= --min_objects <= --max_objects <= {schema.MAX_OBJECTS}, "
                      f"not {values['min_objects']} and {values['max_objects']}")
  for name in ("num_scenes", "samples", "height", "width", "processes"):
    if values[name] < 1:
      raise RenderError(f"--{name} must be at least 1, not {values[name]}")
  assets = check_assets(values["assets_dir"])
  blender = check_blender(values["blender"])
  out = pathlib.Path(values["out"]).expanduser()
  parts = out.with_name(out.name + ".parts")
  wanted = settings(values)
  _start_parts(parts, wanted)
  missing = sorted(set(range(values["num_scenes"])) - finished(parts, values["num_scenes"]))
  print(f"render_clevr: {values['num_scenes'] - len(missing)} scenes already in {parts}, "
        f"{len(missing)} to render", flush=True)
  if missing:
    render_missing(parts, assets, missing, wanted, blender, values["processes"],
                   values["threads"])
  write_tfrecord(out, parts, values["num_scenes"], values["height"], values["width"],
                 values["min_visible_pixels"])
  print(f"render_clevr: {values['num_scenes']} scenes in {out}", flush=True)
  return out


def define_flags() -> None:
  """The command line (defined when run, not on import: the tests import this module)."""
  flags.DEFINE_string(
      "assets_dir", None, "The CLEVR generator's image_generation/data folder.")
  flags.DEFINE_string("out", None, "The GZIP TFRecord to write.")
  flags.DEFINE_integer("seed", 0, "Scene i is drawn from a stream seeded by (seed, i).")
  flags.DEFINE_integer("num_scenes", 300, "Scenes 0..num_scenes-1.")
  flags.DEFINE_integer("min_objects", 3, "Fewest objects in a scene.")
  flags.DEFINE_integer(
      "max_objects", schema.MAX_OBJECTS, "Most objects in a scene (at most 10: 11 slots).")
  flags.DEFINE_integer(
      "samples", 64, "Cycles samples per pixel (the CLEVR generator's default is 512).")
  flags.DEFINE_integer("threads", 0, "Render threads per Blender process; 0: one per CPU.")
  flags.DEFINE_integer("processes", 1, "Blender processes rendering at once.")
  flags.DEFINE_integer("height", schema.IMAGE_HEIGHT, "Image height (pixels).")
  flags.DEFINE_integer("width", schema.IMAGE_WIDTH, "Image width (pixels).")
  flags.DEFINE_integer(
      "min_visible_pixels", 200,
      "Every object shows at least this many pixels, or the layout is drawn again "
      "(the CLEVR generator's rule at 240x320).")
  flags.DEFINE_string("blender", "blender", "The Blender executable.")


def main(argv: Sequence[str]) -> None:
  del argv
  values = {name: flags.FLAGS[name].value for name in (
      "assets_dir", "out", "seed", "num_scenes", "min_objects", "max_objects", "samples",
      "threads", "processes", "height", "width", "min_visible_pixels", "blender")}
  try:
    run(values)
  except RenderError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
