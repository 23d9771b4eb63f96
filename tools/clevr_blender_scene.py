"""Blender side of tools/render_clevr.py: builds and renders CLEVR scenes.

Runs inside Blender's own Python (no NumPy, no TensorFlow there):

  blender --background --factory-startup --python tools/clevr_blender_scene.py -- JOB.json

JOB.json names the official generator's assets, the scene indices to render and
the settings (see `render_clevr.py`, which writes it). Each scene's layout comes
from a random stream seeded by (seed, index) alone, so a scene is the same
whichever process renders it and in whatever order. For every finished scene
the parts folder receives

  scene_NNNNNN.png     the Cycles render, 8-bit sRGB
  scene_NNNNNN.labels  one byte per pixel, row-major: 0 the background (floor,
                       sky), k the object in slot k; from Cycles' object-index
                       pass of a one-sample render through the pixel centres
  scene_NNNNNN.json    the objects (attributes, 3-D and pixel coordinates,
                       projected bounds, visible pixels); written last, so its
                       presence marks the scene finished

The layout follows the CLEVR generator's rules (read there, written here):
objects on a 6x6 square of the floor, surfaces at least `min_dist` apart, at
least `margin` apart along the camera's left/right/front/behind directions, and
every object with at least `min_visible_pixels` visible pixels, else the whole
layout is drawn again from the same stream; camera and lights jittered.
"""

from __future__ import annotations

import array
import json
import math
import os
import random
import sys

import bpy  # pylint: disable=import-error
from bpy_extras.object_utils import world_to_camera_view  # pylint: disable=import-error
from mathutils import Vector  # pylint: disable=import-error

# Blender object names in the generator's base_scene.blend.
_CAMERA = "Camera"
_LIGHTS = ("Lamp_Key", "Lamp_Fill", "Lamp_Back")
# The generator's .blend file (and object / node-group name) per attribute.
_SHAPE_FILES = {"cube": "SmoothCube_v2", "sphere": "Sphere", "cylinder": "SmoothCylinder"}
_MATERIAL_FILES = {"rubber": "Rubber", "metal": "MyMetal"}


def _ground_directions(camera) -> dict[str, Vector]:
  """The camera's behind/left directions projected on the floor (z = 0), unit length."""
  rotation = camera.matrix_world.to_quaternion()
  behind = rotation @ Vector((0.0, 0.0, -1.0))
  left = rotation @ Vector((-1.0, 0.0, 0.0))
  behind.z = 0.0
  left.z = 0.0
  behind.normalize()
  left.normalize()
  return {"behind": behind, "front": -behind, "left": left, "right": -left}


def _draw_layout(rng: random.Random, num_objects: int, properties: dict,
                 directions: dict[str, Vector], job: dict) -> list[dict] | None:
  """Object attributes and floor positions, or None when placement gets stuck."""
  objects = []
  for _ in range(num_objects):
    size = rng.choice(sorted(properties["sizes"]))
    radius = properties["sizes"][size]
    for _ in range(job["max_retries"]):
      x, y = rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0)
      if all(_far_enough(x, y, radius, other, directions, job) for other in objects):
        break
    else:
      return None
    shape = rng.choice(sorted(properties["shapes"]))
    colour = rng.choice(sorted(properties["colors"]))
    material = rng.choice(sorted(properties["materials"]))
    if shape == "cube":  # the cube's half-diagonal, not its half-side, is `radius`
      radius /= math.sqrt(2.0)
    objects.append({"shape": shape, "color": colour, "material": material,
                    "size": size, "radius": radius, "x": x, "y": y,
                    "rotation": 360.0 * rng.random()})
  return objects


def _far_enough(x: float, y: float, radius: float, other: dict,
                directions: dict[str, Vector], job: dict) -> bool:
  dx, dy = x - other["x"], y - other["y"]
  if math.hypot(dx, dy) - radius - other["radius"] < job["min_dist"]:
    return False
  for direction in directions.values():
    along = dx * direction.x + dy * direction.y
    if 0.0 < along < job["margin"]:
      return False
  return True


def _append(path: str, kind: str, name: str):
  with bpy.data.libraries.load(path) as (_, into):
    setattr(into, kind, [name])
  return getattr(into, kind)[0]


def _add_object(spec: dict, slot: int, assets: str, properties: dict):
  name = properties["shapes"][spec["shape"]]
  obj = _append(os.path.join(assets, "shapes", name + ".blend"), "objects", name)
  bpy.context.scene.collection.objects.link(obj)
  obj.name = f"object_{slot}"
  r = spec["radius"]
  obj.scale = (r, r, r)
  obj.location = (spec["x"], spec["y"], r)
  obj.rotation_euler[2] = math.radians(spec["rotation"])
  obj.pass_index = slot

  group_name = properties["materials"][spec["material"]]
  group = bpy.data.node_groups.get(group_name) or _append(
      os.path.join(assets, "materials", group_name + ".blend"), "node_groups", group_name)
  material = bpy.data.materials.new(f"material_{slot}")
  material.use_nodes = True
  nodes = material.node_tree.nodes
  for node in list(nodes):
    if node.type != "OUTPUT_MATERIAL":
      nodes.remove(node)
  output = next(n for n in nodes if n.type == "OUTPUT_MATERIAL")
  shader = nodes.new("ShaderNodeGroup")
  shader.node_tree = group
  # CLEVR's 0-255 colour numbers, used as linear values as the generator does.
  shader.inputs["Color"].default_value = [c / 255.0 for c in properties["colors"][spec["color"]]] + [1.0]
  material.node_tree.links.new(shader.outputs["Shader"], output.inputs["Surface"])
  obj.data.materials.clear()
  obj.data.materials.append(material)
  return obj


def _configure(job: dict) -> None:
  scene = bpy.context.scene
  render = scene.render
  render.engine = "CYCLES"
  render.resolution_x = job["width"]
  render.resolution_y = job["height"]
  render.resolution_percentage = 100
  if job["threads"] > 0:
    render.threads_mode = "FIXED"
    render.threads = job["threads"]
  render.image_settings.file_format = "PNG"
  render.image_settings.color_mode = "RGB"
  render.image_settings.color_depth = "8"
  scene.cycles.device = "CPU"
  scene.cycles.blur_glossy = 2.0  # the generator's setting: tames glossy fireflies
  scene.cycles.transparent_min_bounces = 8
  scene.cycles.transparent_max_bounces = 8
  scene.cycles.use_denoising = False
  scene.cycles.seed = 0
  scene.view_settings.view_transform = "Standard"
  scene.view_layers[0].use_pass_object_index = True


def _render_labels(job: dict, index: int) -> list[int]:
  """Object index per pixel (row-major from the top): one sample through each pixel centre."""
  scene = bpy.context.scene
  beauty = (scene.cycles.samples, scene.cycles.filter_width, scene.cycles.max_bounces)
  scene.cycles.samples = 1
  scene.cycles.filter_width = 0.01  # Blender's least: the sample sits at the centre
  scene.cycles.max_bounces = 0
  scene.use_nodes = True
  tree = scene.node_tree
  tree.nodes.clear()
  layers = tree.nodes.new("CompositorNodeRLayers")
  # The pass goes to a float EXR (exact small integers) read back below; the
  # compositor's Viewer image stays empty in background mode.
  out = tree.nodes.new("CompositorNodeOutputFile")
  out.base_path = job["parts_dir"]
  out.format.file_format = "OPEN_EXR"
  out.format.color_depth = "32"
  out.format.exr_codec = "ZIP"
  out.file_slots[0].path = f"index_pass_{index:06d}_"  # one name per scene and process
  tree.links.new(layers.outputs["IndexOB"], out.inputs[0])
  bpy.ops.render.render(write_still=False)
  path = os.path.join(job["parts_dir"], f"index_pass_{index:06d}_{scene.frame_current:04d}.exr")
  image = bpy.data.images.load(path)
  width, height = image.size
  pixels = array.array("f", [0.0]) * (width * height * 4)
  image.pixels.foreach_get(pixels)
  bpy.data.images.remove(image)
  os.remove(path)
  scene.use_nodes = False
  scene.cycles.samples, scene.cycles.filter_width, scene.cycles.max_bounces = beauty
  if (width, height) != (job["width"], job["height"]):
    raise RuntimeError(f"index pass is {width}x{height}, not {job['width']}x{job['height']}")
  # Blender's rows run bottom-up; the records' run top-down.
  labels = []
  for row in range(height - 1, -1, -1):
    start = row * width * 4
    labels.extend(int(round(v)) for v in pixels[start:start + width * 4:4])
  return labels


def _projected(scene, camera, point: Vector) -> tuple[float, float, float]:
  """(column, row, depth) in pixels from the top-left, as the generator's pixel_coords."""
  u, v, depth = world_to_camera_view(scene, camera, point)
  return (u * scene.render.resolution_x, (1.0 - v) * scene.render.resolution_y, depth)


def _bounds(scene, camera, obj) -> list[float]:
  """The pixel box [col0, row0, col1, row1] holding the object's projected bounding box."""
  corners = [_projected(scene, camera, obj.matrix_world @ Vector(c)) for c in obj.bound_box]
  cols, rows = [c[0] for c in corners], [c[1] for c in corners]
  return [min(cols), min(rows), max(cols), max(rows)]


def render_scene(index: int, job: dict, properties: dict) -> None:
  assets = job["assets_dir"]
  rng = random.Random(f"clevr_jax render_clevr seed={job['seed']} index={index}")
  num_objects = rng.randint(job["min_objects"], job["max_objects"])
  for attempt in range(job["max_layouts"]):
    bpy.ops.wm.open_mainfile(filepath=os.path.join(assets, "base_scene.blend"))
    _configure(job)
    scene = bpy.context.scene
    scene.cycles.samples = job["samples"]
    camera = bpy.data.objects[_CAMERA]
    for name, jitter in ((_CAMERA, job["camera_jitter"]),) + tuple(
        (light, job["light_jitter"]) for light in _LIGHTS):
      for axis in range(3):
        bpy.data.objects[name].location[axis] += rng.uniform(-jitter, jitter)
    bpy.context.view_layer.update()
    layout = _draw_layout(rng, num_objects, properties, _ground_directions(camera), job)
    if layout is None:
      continue
    blender_objects = [_add_object(spec, slot, assets, properties)
                       for slot, spec in enumerate(layout, start=1)]
    bpy.context.view_layer.update()
    labels = _render_labels(job, index)
    counts = [labels.count(slot) for slot in range(len(layout) + 1)]
    if min(counts[1:]) >= job["min_visible_pixels"]:
      break
  else:
    raise RuntimeError(f"scene {index}: no layout with every object visible in "
                       f"{job['max_layouts']} tries; lower --min_visible_pixels")

  stem = os.path.join(job["parts_dir"], f"scene_{index:06d}")
  scene.render.filepath = stem + ".png"
  bpy.ops.render.render(write_still=True)
  with open(stem + ".labels", "wb") as f:
    f.write(bytes(labels))
  for spec, obj, count in zip(layout, blender_objects, counts[1:]):
    spec["z"] = obj.location.z
    spec["pixel_coords"] = list(_projected(scene, camera, obj.location))
    spec["bounds"] = _bounds(scene, camera, obj)
    spec["visible_pixels"] = count
  record = {"index": index, "seed": job["seed"], "layout_attempts": attempt + 1,
            "height": job["height"], "width": job["width"], "samples": job["samples"],
            "blender": bpy.app.version_string, "objects": layout}
  with open(stem + ".json.tmp", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(stem + ".json.tmp", stem + ".json")


def main() -> None:
  with open(sys.argv[sys.argv.index("--") + 1]) as f:
    job = json.load(f)
  with open(os.path.join(job["assets_dir"], "properties.json")) as f:
    properties = json.load(f)
  for index in job["indices"]:
    render_scene(index, job, properties)
    print(f"render_clevr: scene {index} done", flush=True)


if __name__ == "__main__":
  main()
