"""CLEVR-like scenes, ray cast in NumPy, with exact instance labels.

Every pixel's camera ray is intersected analytically with the floor and with
each object (spheres, upright cylinders, cubes as oriented boxes); the nearest
hit names the pixel's label, so the labels partition the image and occlusion
is exact by construction.

Scenes are sampled as CLEVR's generator (`clevr-dataset-gen`) samples them:
radii 0.7 (large) and 0.35 (small), centres uniform in [-3, 3]^2, a gap of at
least 0.25 between footprints' circumcircles and 0.4 along the camera's ground
axes, and every object at least 200 visible pixels at 480x320 (scaled by image
area here); a failed scene is placed again. Camera and lights are CLEVR's base
scene (positions as Kubric reproduces them), jittered as CLEVR jitters them.
A cube's half side is the radius: CLEVR's code divides it by sqrt(2), but the
cubes of the real `clevr_with_masks` samples cover about twice the pixels such
cubes would (spheres and cylinders match), so the released data did not.

Shading imitates CLEVR's Cycles renders cheaply, in linear light then sRGB:
Lambert from three point lights (key, fill, back) plus hemisphere ambient,
soft cast shadows from a few samples of the key light (on the floor and on
other objects), and for metal a mirror reflection of the floor and highlights.
Three settings, off by default, bring the shadows nearer CLEVR's base scene,
whose world is black and whose light is the three area lamps and a sun nearly
overhead: `shadow_lights` lets the fill and back lamps cast shadows too,
`sun_share` makes that share of the ambient CLEVR's sun, a directional light
with sharp shadows (the rest stays hemisphere ambient), and `contact_occlusion`
darkens the floor where objects meet it.
Colours are CLEVR's sRGB numbers used as linear albedo, as Blender uses them.

Speed: object tests run only on the pixels inside each object's screen
bounding box (or its shadow volume's), so a 240x320 scene takes tens of
milliseconds on one core. NumPy only: TFDS builders call this in worker
processes that must not need TensorFlow or JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
from typing import Iterator, Sequence

import numpy as np

from clevr_jax import schema

# Bump whenever the output for a given seed and config changes.
RENDERER_VERSION = 3

SPHERE, CYLINDER, CUBE = 1, 2, 3  # schema.SHAPES codes
RUBBER, METAL = 1, 2  # schema.MATERIALS codes
# schema.SIZES code -> CLEVR's scale (sphere and cylinder radius).
SIZE_RADII = {1: 0.7, 2: 0.35}

# CLEVR's visibility rule: 200 pixels per object in a 480x320 render.
_CLEVR_MIN_PIXELS = 200
_CLEVR_IMAGE_AREA = 480 * 320
_MAX_SCENE_ATTEMPTS = 1000  # far beyond what CLEVR-like settings need
_EPS = 1e-4  # ray offset that keeps a surface from shadowing itself


def _hex_to_linear_rgb(code: int) -> tuple[float, float, float]:
  # Blender takes colour numbers as linear values; so do we.
  return ((code >> 16 & 255) / 255, (code >> 8 & 255) / 255, (code & 255) / 255)


@dataclasses.dataclass(frozen=True)
class Light:
  """A point light; irradiance = intensity * colour * cos(angle) / distance^2.

  radius: the extent of the lamp its shadows are sampled over (the key
  light's is SceneConfig.key_light_radius instead).
  """
  position: tuple[float, float, float]
  color: tuple[float, float, float]
  intensity: float
  radius: float = 0.0


# CLEVR's three area lamps (positions and colours as in Kubric's CLEVR set-up),
# as point lights. Intensities and ambient are a least-squares fit of the
# floor's shading to the background of the two real samples. The key light
# comes first: it always casts shadows. The fill and back lamps' radii are
# discs of the area of base_scene.blend's square lamps (sides 0.5 and 1).
CLEVR_LIGHTS = (
    Light((6.44671, -2.90517, 4.2584), _hex_to_linear_rgb(0xffedd0), 9.9),
    Light((-4.67112, -4.0136, 3.01122), _hex_to_linear_rgb(0xc2d0ff), 2.6,
          0.5 / math.sqrt(math.pi)),
    Light((-1.1685, 2.64602, 5.81574), (1.0, 1.0, 1.0), 4.5, 1 / math.sqrt(math.pi)),
)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """Everything that shapes a scene. Defaults imitate CLEVR at 240x320."""
  height: int = schema.IMAGE_HEIGHT
  width: int = schema.IMAGE_WIDTH
  min_objects: int = 3
  max_objects: int = 10
  # None: CLEVR's 200 px at 480x320, scaled to this image's area (100 px at
  # 240x320), so that a smaller image keeps the same rule.
  min_visible_pixels: int | None = None
  # Placement (CLEVR's generator): centres uniform in [-extent, extent]^2.
  placement_extent: float = 3.0
  min_gap: float = 0.25
  min_axis_margin: float = 0.4
  max_placement_tries: int = 50
  # Toy scenes: no two objects of a scene share a colour (at most
  # len(schema.COLORS) objects), and every object is rubber (no mirror
  # reflections), so that colour alone tells the objects apart.
  distinct_colors: bool = False
  metal: bool = True
  # A cube's half side as a multiple of its size's radius: 1 covers the pixels
  # of the real samples' cubes; CLEVR's generator (and tools/render_clevr.py)
  # divides by sqrt(2), 0.7071.
  cube_scale: float = 1.0
  # A floor of one colour per scene (its shading's mean): no brightness
  # gradient and no shadows on it, so that the background says nothing about
  # where a pixel is (objects keep their shading and shadows on each other).
  plain_floor: bool = False
  # The camera's focal length times `zoom`, the placement area's side over it:
  # each object `zoom` times larger in the image, the scene still in view (toy
  # scenes where objects fill more of a small image, as in Multi-dSprites).
  zoom: float = 1.0
  # Camera: CLEVR's base scene, a 35 mm lens on a 32 mm sensor, looking at
  # the origin from about 28 degrees above the floor.
  camera_position: tuple[float, float, float] = (7.48113, -6.50764, 5.34367)
  camera_jitter: float = 0.5
  focal_length_mm: float = 35.0
  sensor_width_mm: float = 32.0
  # Lighting.
  lights: tuple[Light, ...] = CLEVR_LIGHTS
  light_jitter: float = 1.0
  ambient: float = 0.265  # irradiance from the environment on an upward face
  ground_bounce: float = 0.05  # fraction of it that reaches a downward face
  floor_albedo: float = 0.5
  # What metal mirrors above the horizon: CLEVR's studio is dark behind the
  # camera and a gray backdrop beyond the scene.
  sky_radiance: float = 0.02
  backdrop_radiance: float = 0.13
  key_light_radius: float = 0.6  # soft shadows: the key light's extent
  shadow_samples: int = 4  # samples per pixel of each shadowing lamp (1: hard shadows)
  # How many of the lights, key first, cast shadows: 1 the key alone, 3 also
  # the fill and back lamps (as CLEVR's Cycles renders do).
  shadow_lights: int = 1
  # The share of the ambient that is CLEVR's sun (base_scene.blend: a sun at
  # this position, not jittered; only its direction counts), a directional
  # light casting sharp shadows; the rest stays hemisphere ambient. Scaled so
  # that an open floor is as bright at any share.
  sun_share: float = 0.0
  sun_position: tuple[float, float, float] = (11.6608, -6.628, 25.8232)
  # The dark line where an object meets the floor (Cycles' renders have it:
  # there the object hides much of every light and of the light bounced off
  # the floor): the share of all the floor's light hidden at a footprint's
  # edge, falling off as exp(-distance / contact_reach) away from it.
  contact_occlusion: float = 0.0
  contact_reach: float = 0.05

  def __post_init__(self):
    if not 1 <= self.min_objects <= self.max_objects <= schema.MAX_OBJECTS:
      raise ValueError(
          f"need 1 <= min_objects <= max_objects <= {schema.MAX_OBJECTS}, got "
          f"{self.min_objects}, {self.max_objects}")
    if self.height < 8 or self.width < 8:
      raise ValueError(f"image too small: {self.height}x{self.width}")
    if self.min_visible_pixels is not None and self.min_visible_pixels < 1:
      # Every object must be visible: only visible objects may own a slot.
      raise ValueError("min_visible_pixels must be >= 1")
    if self.distinct_colors and self.max_objects > len(schema.COLORS):
      raise ValueError(f"distinct colours allow at most {len(schema.COLORS)} objects, "
                       f"got max_objects={self.max_objects}")
    if not self.lights or self.shadow_samples < 1:
      raise ValueError("need at least one light and one shadow sample")
    if not self.cube_scale > 0:
      raise ValueError(f"cube_scale must be > 0, got {self.cube_scale}")
    if not 1 <= self.shadow_lights <= len(self.lights):
      raise ValueError(f"shadow_lights must be in [1, {len(self.lights)}] (the lights "
                       f"that cast shadows, key first), got {self.shadow_lights}")
    if not 0 <= self.sun_share <= 1:
      raise ValueError(f"sun_share must be in [0, 1], got {self.sun_share}")
    if not 0 <= self.contact_occlusion <= 1:
      raise ValueError(f"contact_occlusion must be in [0, 1], got {self.contact_occlusion}")
    if not self.contact_reach > 0:
      raise ValueError(f"contact_reach must be > 0, got {self.contact_reach}")
    if not self.sun_position[2] > 0:
      raise ValueError(f"sun_position must be above the floor, got {self.sun_position}")
    if not self.zoom > 0:
      raise ValueError(f"zoom must be > 0, got {self.zoom}")

  @property
  def visible_pixel_threshold(self) -> int:
    """The least number of pixels every object of a scene must show."""
    if self.min_visible_pixels is not None:
      return self.min_visible_pixels
    scaled = _CLEVR_MIN_PIXELS * self.height * self.width / _CLEVR_IMAGE_AREA
    return max(1, math.ceil(scaled))


@dataclasses.dataclass(frozen=True)
class _Camera:
  position: np.ndarray  # [3]
  forward: np.ndarray  # unit vectors [3]
  right: np.ndarray
  up: np.ndarray
  half_width: float  # image-plane half extents at unit depth
  half_height: float
  height: int
  width: int

  def rays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel ray directions [H, W] x 3, scaled so that t is the depth."""
    cols = ((np.arange(self.width, dtype=np.float32) + 0.5) / self.width * 2 - 1)
    rows = 1 - (np.arange(self.height, dtype=np.float32) + 0.5) / self.height * 2
    u = (cols * self.half_width)[None, :]
    v = (rows * self.half_height)[:, None]
    return tuple(
        (self.forward[i] + u * self.right[i] + v * self.up[i]).astype(np.float32)
        for i in range(3))

  def project(self, points: np.ndarray) -> np.ndarray:
    """World points [N, 3] -> [N, 3] (column, row, depth along the view).

    Continuous pixel coordinates: pixel (r, c) spans [r, r + 1) x [c, c + 1).
    """
    rel = points - self.position
    depth = rel @ self.forward
    safe_depth = np.where(depth > 1e-6, depth, 1e-6)
    col = (rel @ self.right / safe_depth / self.half_width + 1) / 2 * self.width
    row = (1 - rel @ self.up / safe_depth / self.half_height) / 2 * self.height
    return np.stack([col, row, depth], axis=-1)

  def ground_axes(self) -> tuple[tuple[float, float], tuple[float, float]]:
    """The camera's right and forward directions flattened onto the floor."""
    axes = []
    for axis in (self.right, self.forward):
      length = math.hypot(axis[0], axis[1])
      axes.append((float(axis[0] / length), float(axis[1] / length)))
    return axes[0], axes[1]


def _make_camera(position: np.ndarray, config: SceneConfig) -> _Camera:
  forward = -position / np.linalg.norm(position)  # looks at the origin
  right = np.cross(forward, [0.0, 0.0, 1.0])
  right /= np.linalg.norm(right)
  up = np.cross(right, forward)
  # Blender's automatic sensor fit: the sensor spans the larger image side.
  half_extent = config.sensor_width_mm / 2 / (config.focal_length_mm * config.zoom)
  longer = max(config.height, config.width)
  return _Camera(position=position, forward=forward, right=right, up=up,
                 half_width=half_extent * config.width / longer,
                 half_height=half_extent * config.height / longer,
                 height=config.height, width=config.width)


@dataclasses.dataclass(frozen=True)
class _Objects:
  """The placed objects of one scene, one entry per object."""
  shape: np.ndarray  # uint8 codes
  size: np.ndarray
  material: np.ndarray
  color: np.ndarray
  x: np.ndarray  # float64 centres on the floor
  y: np.ndarray
  half_height: np.ndarray  # centre height: the radius, or a cube's half side
  footprint_radius: np.ndarray  # circumradius of the footprint on the floor
  rotation: np.ndarray  # degrees about the vertical axis

  def __len__(self) -> int:
    return len(self.shape)

  def bounding_corners(self) -> np.ndarray:
    """[objects, 8, 3] corners of an axis-aligned box around each object."""
    signs = np.array([(sx, sy, sz) for sx in (-1, 1) for sy in (-1, 1)
                      for sz in (0, 1)], np.float64)
    r = self.footprint_radius[:, None]
    return np.stack([self.x[:, None] + signs[:, 0] * r,
                     self.y[:, None] + signs[:, 1] * r,
                     signs[:, 2] * 2 * self.half_height[:, None]], axis=-1)


def _place_objects(rng: np.random.Generator, count: int, config: SceneConfig,
                   camera: _Camera) -> _Objects | None:
  """CLEVR's placement of `count` objects; None when one cannot be placed."""
  (right_x, right_y), (forward_x, forward_y) = camera.ground_axes()
  extent = config.placement_extent / config.zoom
  placed = []  # (x, y, footprint radius); plain floats: faster than NumPy here
  attributes = []
  for _ in range(count):
    size = int(rng.integers(1, len(SIZE_RADII) + 1))
    # The shape comes before the position (CLEVR draws it after): a cube's
    # footprint reaches further, and the gap must hold for it too.
    shape = int(rng.integers(1, len(schema.SHAPES) + 1))
    footprint = SIZE_RADII[size] * (config.cube_scale * math.sqrt(2) if shape == CUBE else 1)
    for _ in range(config.max_placement_tries):
      x, y = (float(v) for v in rng.uniform(-extent, extent, size=2))
      # CLEVR also keeps objects apart along the camera's left/right and
      # front/behind axes, so that spatial relations are unambiguous.
      if all(math.hypot(x - other_x, y - other_y) - footprint - other_footprint
             >= config.min_gap
             and abs((x - other_x) * right_x + (y - other_y) * right_y)
             >= config.min_axis_margin
             and abs((x - other_x) * forward_x + (y - other_y) * forward_y)
             >= config.min_axis_margin
             for other_x, other_y, other_footprint in placed):
        break
    else:
      return None
    color = int(rng.integers(1, len(schema.COLORS) + 1))
    used = {a[3] for a in attributes}
    if config.distinct_colors and color in used:
      # Drawn again from the unused colours only: the default scenes' draws
      # (distinct_colors off) stay as they are.
      color = int(rng.choice([c for c in range(1, len(schema.COLORS) + 1) if c not in used]))
    rotation = float(rng.uniform(0.0, 360.0))
    material = int(rng.integers(1, len(schema.MATERIALS) + 1))
    if not config.metal:
      material = RUBBER
    placed.append((x, y, footprint))
    attributes.append((shape, size, material, color, rotation))
  shape, size, material, color, rotation = (np.array(a) for a in zip(*attributes))
  x, y, footprint = (np.array(a) for a in zip(*placed))
  return _Objects(
      shape=shape.astype(np.uint8), size=size.astype(np.uint8),
      material=material.astype(np.uint8), color=color.astype(np.uint8),
      x=x, y=y, half_height=np.array([SIZE_RADII[s] * (config.cube_scale if k == CUBE else 1)
                                      for s, k in zip(size, shape)]),
      footprint_radius=footprint, rotation=rotation)


# Ray-object intersections. Origins and directions are arrays of equal shape
# (or scalars for the camera's origin); each returns the ray parameter t of the
# first hit with t > _EPS, np.inf where the ray misses. Directions need not be
# unit vectors. All objects are convex, which shadows rely on (see
# _light_visibility).


def _hit_sphere(cx, cy, cz, r, ox, oy, oz, dx, dy, dz):
  px, py, pz = ox - cx, oy - cy, oz - cz
  a = dx * dx + dy * dy + dz * dz
  b = px * dx + py * dy + pz * dz
  c = px * px + py * py + pz * pz - r * r
  disc = b * b - a * c
  t = (-b - np.sqrt(np.maximum(disc, 0))) / a
  return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _hit_cylinder(cx, cy, r, top, ox, oy, oz, dx, dy, dz):
  """An upright cylinder standing on the floor; its base is never seen."""
  px, py = ox - cx, oy - cy
  a = dx * dx + dy * dy
  b = px * dx + py * dy
  c = px * px + py * py - r * r
  disc = b * b - a * c
  t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
  z_side = oz + t_side * dz
  side = (disc >= 0) & (t_side > _EPS) & (z_side >= 0) & (z_side <= top)
  t_cap = (top - oz) / dz
  qx, qy = px + t_cap * dx, py + t_cap * dy
  cap = (t_cap > _EPS) & (qx * qx + qy * qy <= r * r)
  t = np.where(side, t_side, np.inf)
  return np.where(cap, np.minimum(t, t_cap), t)


def _hit_box(cx, cy, cz, half, cos, sin, ox, oy, oz, dx, dy, dz):
  """A cube rotated about the vertical: the slab method in its own frame."""
  px, py, pz = ox - cx, oy - cy, oz - cz
  local = ((cos * px + sin * py, cos * dx + sin * dy),
           (cos * py - sin * px, cos * dy - sin * dx),
           (pz, dz))
  t_near, t_far = -np.inf, np.inf
  for p, d in local:
    inv = 1 / d
    t1, t2 = (-half - p) * inv, (half - p) * inv
    t_near = np.maximum(t_near, np.minimum(t1, t2))
    t_far = np.minimum(t_far, np.maximum(t1, t2))
  return np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)


def _hit(objects: _Objects, k: int, ox, oy, oz, dx, dy, dz) -> np.ndarray:
  cx, cy, h = objects.x[k], objects.y[k], objects.half_height[k]
  shape = objects.shape[k]
  if shape == SPHERE:
    return _hit_sphere(cx, cy, h, h, ox, oy, oz, dx, dy, dz)
  if shape == CYLINDER:
    return _hit_cylinder(cx, cy, h, 2 * h, ox, oy, oz, dx, dy, dz)
  angle = math.radians(objects.rotation[k])
  return _hit_box(cx, cy, h, h, math.cos(angle), math.sin(angle),
                  ox, oy, oz, dx, dy, dz)


def _normal(objects: _Objects, k: int, px, py, pz):
  """Outward unit normal of object k at surface points (px, py, pz)."""
  cx, cy, h = objects.x[k], objects.y[k], objects.half_height[k]
  rx, ry, rz = px - cx, py - cy, pz - h
  shape = objects.shape[k]
  if shape == SPHERE:
    return rx / h, ry / h, rz / h
  if shape == CYLINDER:
    radial = np.sqrt(rx * rx + ry * ry)
    # A point nearer the top plane than the side surface lies on the cap
    # (the radius is the half height).
    on_cap = (h - rz) <= (h - radial)
    safe = np.maximum(radial, 1e-6)
    return (np.where(on_cap, 0, rx / safe), np.where(on_cap, 0, ry / safe),
            on_cap.astype(rx.dtype))
  angle = math.radians(objects.rotation[k])
  cos, sin = math.cos(angle), math.sin(angle)
  lx, ly = cos * rx + sin * ry, cos * ry - sin * rx
  ax, ay, az = np.abs(lx), np.abs(ly), np.abs(rz)
  # The face is the axis along which the point reaches the half side.
  on_x = (ax >= ay) & (ax >= az)
  on_y = ~on_x & (ay >= az)
  on_z = ~on_x & ~on_y
  nlx, nly = on_x * np.sign(lx), on_y * np.sign(ly)
  return (cos * nlx - sin * nly, sin * nlx + cos * nly,
          (on_z * np.sign(rz)).astype(rx.dtype))


def _screen_boxes(camera: _Camera, points: np.ndarray
                  ) -> list[tuple[slice, slice] | None]:
  """For each group of points [groups, P, 3], the pixel rows and columns
  (slices) that may see the group's convex hull; None when off screen."""
  projected = camera.project(points.reshape(-1, 3)).reshape(points.shape)
  cols, rows = projected[..., 0], projected[..., 1]
  behind = np.any(projected[..., 2] <= 1e-3, axis=-1)
  col0 = np.clip(np.floor(cols.min(-1)) - 1, 0, camera.width).astype(int)
  col1 = np.clip(np.ceil(cols.max(-1)) + 1, 0, camera.width).astype(int)
  row0 = np.clip(np.floor(rows.min(-1)) - 1, 0, camera.height).astype(int)
  row1 = np.clip(np.ceil(rows.max(-1)) + 1, 0, camera.height).astype(int)
  boxes = []
  for g in range(len(points)):
    if behind[g]:  # the hull reaches behind the camera: test every pixel
      boxes.append((slice(0, camera.height), slice(0, camera.width)))
    elif col0[g] >= col1[g] or row0[g] >= row1[g]:
      boxes.append(None)
    else:
      boxes.append((slice(row0[g], row1[g]), slice(col0[g], col1[g])))
  return boxes


def _cast_camera_rays(objects: _Objects, camera: _Camera, rays
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Depth [H, W] of the nearest hit and its label (0 floor, k + 1 object k)."""
  dx, dy, dz = rays
  cam_x, cam_y, cam_z = (np.float32(c) for c in camera.position)
  looking_down = dz < -1e-6
  # Rays that never meet the floor (only with unusual cameras) see it far off.
  depth = np.where(looking_down, -cam_z / np.where(looking_down, dz, -1), 1e4)
  depth = depth.astype(np.float32)
  labels = np.zeros(depth.shape, np.uint8)
  for k, box in enumerate(_screen_boxes(camera, objects.bounding_corners())):
    if box is None:
      continue
    t = _hit(objects, k, cam_x, cam_y, cam_z, dx[box], dy[box], dz[box])
    nearer = t < depth[box]
    depth[box][nearer] = t[nearer]
    labels[box][nearer] = k + 1
  return depth, labels


def _sample_disc(count: int) -> np.ndarray:
  """`count` fixed offsets [count, 2] spread evenly over the unit disc."""
  if count == 1:
    return np.zeros((1, 2))
  index = np.arange(count) + 0.5
  radius = np.sqrt(index / count)
  angle = index * math.pi * (3 - math.sqrt(5))  # golden-angle spiral
  return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)


def _disc_samples(position: np.ndarray, radius: float, count: int) -> np.ndarray:
  """`count` points [count, 3] on a disc of `radius` at `position`, facing the origin."""
  towards = -position / np.linalg.norm(position)
  side = np.cross(towards, [0.0, 0.0, 1.0])
  side /= np.linalg.norm(side)
  lift = np.cross(side, towards)
  offsets = _sample_disc(count) * radius
  return position + offsets[:, :1] * side + offsets[:, 1:] * lift


def _light_visibility(objects: _Objects, camera: _Camera, labels, points,
                      samples: np.ndarray) -> np.ndarray:
  """Fraction [H, W] of a lamp's sample points [S, 3] that each hit point sees."""
  px, py, pz = points
  # A point shadowed by object k lies between k and k's shadow on the floor:
  # in the hull of k's box corners and their shadows.
  corners = objects.bounding_corners()[None]  # [1, objects, 8, 3]
  light_z = samples[:, None, None, 2:]
  above = light_z - corners[..., 2:] > 1e-3
  stretch = light_z / np.where(above, light_z - corners[..., 2:], 1)
  on_floor = samples[:, None, None] + (corners - samples[:, None, None]) * stretch
  hulls = np.concatenate([np.broadcast_to(corners, on_floor.shape), on_floor], 2)
  boxes = _screen_boxes(camera, hulls.reshape((-1,) + hulls.shape[2:]))
  everywhere = (slice(0, camera.height), slice(0, camera.width))
  visibility = np.ones(labels.shape, np.float32)
  share = np.float32(1 / len(samples))
  for s, light in enumerate(samples):
    blocked = np.zeros(labels.shape, bool)
    for k in range(len(objects)):
      # A lamp below an object's top casts an unbounded shadow.
      box = boxes[s * len(objects) + k] if above[s, k].all() else everywhere
      if box is None:
        continue
      # A convex object cannot shadow its own lit side; its dark side is
      # already dark by Lambert's cosine, so it is skipped.
      receivers = labels[box] != k + 1
      bx, by, bz = px[box], py[box], pz[box]
      t = _hit(objects, k, bx, by, bz,
               np.float32(light[0]) - bx, np.float32(light[1]) - by,
               np.float32(light[2]) - bz)
      blocked[box] |= receivers & (t < 1)
    visibility -= share * blocked
  return visibility


# The sun as a point this many scene units away along its direction (the
# scene spans about 10), over a disc of this angular radius: CLEVR's sun is
# nearly hard (its size 0.1).
_SUN_DISTANCE = 1000.0
_SUN_ANGULAR_RADIUS = 0.05


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
  """Mean over the (2 radius + 1)^2 square around each pixel (edges clamped)."""
  size = 2 * radius + 1
  for axis in (0, 1):
    padded = np.concatenate(
        [np.repeat(image.take([0], axis), radius + 1, axis), image,
         np.repeat(image.take([-1], axis), radius, axis)], axis)
    sums = np.cumsum(padded, axis=axis, dtype=np.float32)
    image = (sums.take(range(size, sums.shape[axis]), axis)
             - sums.take(range(0, sums.shape[axis] - size), axis)) / size
  return image


_PENUMBRA_BLUR = 2  # pixels, at any image size: it only hides sampling steps


def _floor_occlusion(objects: _Objects, camera: _Camera, labels, px, py
                     ) -> np.ndarray:
  """Share [H, W] of the ambient light that objects hide from the floor.

  Each object counts as a sphere of its volume at its centre, whose projected
  solid angle from a floor point is r^2 h / d^3: 1 at a sphere's contact
  point, the dark rim under objects in CLEVR's renders.
  """
  radii = objects.half_height * np.array(
      [_VOLUME_SPHERE_RADIUS[int(shape)] for shape in objects.shape])
  reach = 4 * radii  # beyond it the occlusion is under 2%
  signs = np.array([(sx, sy) for sx in (-1, 1) for sy in (-1, 1)], np.float64)
  squares = np.stack([objects.x[:, None] + signs[:, 0] * reach[:, None],
                      objects.y[:, None] + signs[:, 1] * reach[:, None],
                      np.zeros((len(objects), 4))], axis=-1)
  occlusion = np.zeros(labels.shape, np.float32)
  for k, box in enumerate(_screen_boxes(camera, squares)):
    if box is None:
      continue
    x, y, h, radius = objects.x[k], objects.y[k], objects.half_height[k], radii[k]
    ox, oy = px[box] - np.float32(x), py[box] - np.float32(y)
    dist2 = ox * ox + oy * oy + np.float32(h * h)
    share = np.float32(radius * radius * h) / (dist2 * np.sqrt(dist2))
    occlusion[box] += np.where(labels[box] == 0, share, 0)
  return np.minimum(occlusion, 1)


_CONTACT_CUTOFF = 8  # contact reaches: beyond, exp(-8) < 0.1% is left out


def _floor_contact(objects: _Objects, camera: _Camera, labels, px, py,
                   strength: float, reach: float) -> np.ndarray:
  """Share [H, W] of the floor's light that reaches it past the objects' contact.

  Each object hides `strength` of it at its footprint's edge (a disc, or a
  cube's rotated square), exp(-gap / reach) of that at a gap from it.
  """
  margin = objects.footprint_radius + _CONTACT_CUTOFF * reach
  signs = np.array([(sx, sy) for sx in (-1, 1) for sy in (-1, 1)], np.float64)
  squares = np.stack([objects.x[:, None] + signs[:, 0] * margin[:, None],
                      objects.y[:, None] + signs[:, 1] * margin[:, None],
                      np.zeros((len(objects), 4))], axis=-1)
  passed = np.ones(labels.shape, np.float32)
  for k, box in enumerate(_screen_boxes(camera, squares)):
    if box is None:
      continue
    ox, oy = px[box] - np.float32(objects.x[k]), py[box] - np.float32(objects.y[k])
    h = np.float32(objects.half_height[k])
    if objects.shape[k] == CUBE:
      angle = math.radians(objects.rotation[k])
      cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
      lx = np.maximum(np.abs(cos * ox + sin * oy) - h, 0)
      ly = np.maximum(np.abs(cos * oy - sin * ox) - h, 0)
      gap = np.sqrt(lx * lx + ly * ly)
    else:
      gap = np.maximum(np.sqrt(ox * ox + oy * oy) - h, 0)
    hidden = np.float32(strength) * np.exp(-gap / np.float32(reach))
    passed[box] *= np.where(labels[box] == 0, 1 - hidden, 1)
  return passed


# Radius of the sphere of an object's volume, in units of its half height.
_VOLUME_SPHERE_RADIUS = {SPHERE: 1.0, CYLINDER: 1.5 ** (1 / 3),
                         CUBE: (6 / math.pi) ** (1 / 3)}


def _floor_irradiance(qx, qy, lights, ambient, visibilities=()):
  """Irradiance (r, g, b) on the floor at (qx, qy); light i's scaled by
  visibilities[i] where there is one (the shadowing lights, key first)."""
  channels = [np.zeros(qx.shape, np.float32) + ambient for _ in range(3)]
  for index, (position, color, intensity, _) in enumerate(lights):
    lx, ly = np.float32(position[0]) - qx, np.float32(position[1]) - qy
    lz = np.float32(position[2])
    dist2 = lx * lx + ly * ly + lz * lz
    strength = (intensity * lz) / (dist2 * np.sqrt(dist2))  # cos / d^2
    if index < len(visibilities):
      strength *= visibilities[index]
    for c in range(3):
      channels[c] += strength * np.float32(color[c])
  return channels


def _object_radiance(objects: _Objects, camera: _Camera, config: SceneConfig,
                     lights, labels, points, view, visibilities, sun
                     ) -> np.ndarray:
  """Linear colours [N, 3] of N object pixels, given flat per-pixel inputs.

  labels: [N] object labels (k + 1); points, view: hit points and unit view
  directions as (x, y, z) arrays of [N]; visibilities: [N] per shadowing
  light, key first; sun: (unit direction [3], visibility [N]) when
  config.sun_share > 0, else None.
  """
  px, py, pz = points
  nx, ny, nz = (np.empty_like(px) for _ in range(3))
  for k in range(len(objects)):
    mine = labels == k + 1
    normal = _normal(objects, k, px[mine], py[mine], pz[mine])
    for full, part in zip((nx, ny, nz), normal):
      full[mine] = part
  albedo = np.zeros((len(objects) + 1, 3), np.float32)
  albedo[1:] = [schema.COLORS[int(c)][1] for c in objects.color]
  albedo = albedo[labels] / 255  # CLEVR's numbers, used as linear albedo
  is_metal = np.concatenate([[False], objects.material == METAL])[labels]

  vx, vy, vz = view
  v_dot_n = vx * nx + vy * ny + vz * nz
  rx, ry, rz = vx - 2 * v_dot_n * nx, vy - 2 * v_dot_n * ny, vz - 2 * v_dot_n * nz

  # Hemisphere ambient: all of it from above, the floor's bounce from below.
  hemisphere = (1 + nz) / 2 + config.ground_bounce * (1 - nz) / 2
  ambient = config.ambient * (1 - config.sun_share) * hemisphere
  if sun is not None:
    (sx, sy, sz), sun_visibility = sun
    # Irradiance sun_share * ambient on an upward face, as on the floor.
    facing = np.maximum(sx * nx + sy * ny + sz * nz, 0) / np.float32(sz)
    ambient = ambient + config.ambient * config.sun_share * facing * sun_visibility
  irradiance = [ambient.copy() for _ in range(3)]
  key_visibility = visibilities[0]
  highlight = np.zeros_like(px)
  sheen = np.zeros_like(px)
  for index, (position, color, intensity, _) in enumerate(lights):
    lx = np.float32(position[0]) - px
    ly = np.float32(position[1]) - py
    lz = np.float32(position[2]) - pz
    inv_dist = 1 / np.sqrt(lx * lx + ly * ly + lz * lz)
    lx, ly, lz = lx * inv_dist, ly * inv_dist, lz * inv_dist
    strength = (np.float32(intensity) * inv_dist * inv_dist
                * np.maximum(lx * nx + ly * ny + lz * nz, 0))
    alignment = np.maximum(rx * lx + ry * ly + rz * lz, 0)
    # The lamps mirrored in metal: small and bright, in a glossy blur.
    lobe = (_SHARP_HIGHLIGHT * alignment ** 200
            + _BROAD_HIGHLIGHT * alignment ** 8)
    lobe = lobe * intensity / CLEVR_LIGHTS[0].intensity
    if index < len(visibilities):
      strength *= visibilities[index]
      lobe *= visibilities[index]
    if index == 0:
      sheen += key_visibility * alignment ** 6 * _RUBBER_SHEEN
    highlight += lobe
    for c in range(3):
      irradiance[c] += strength * np.float32(color[c])

  # Metal mirrors the floor (lit as the floor is, unshadowed) below the
  # horizon and the studio above it, blended so no horizon line shows.
  mirrored = np.zeros((3,) + px.shape, np.float32)
  if is_metal.any():
    m_rx, m_ry, m_rz = rx[is_metal], ry[is_metal], rz[is_metal]
    reach = -pz[is_metal] / np.minimum(m_rz, -1e-3)
    floor_light = _floor_irradiance(px[is_metal] + reach * m_rx,
                                    py[is_metal] + reach * m_ry,
                                    lights, config.ambient)
    below = np.clip(-m_rz / 0.25, 0, 1)
    ahead_x, ahead_y = camera.ground_axes()[1]
    ahead = np.clip(m_rx * ahead_x + m_ry * ahead_y, 0, 1)
    studio = (config.sky_radiance
              + (config.backdrop_radiance - config.sky_radiance) * ahead)
    for c in range(3):
      mirrored[c][is_metal] = (below * config.floor_albedo * floor_light[c]
                               + (1 - below) * studio)

  colours = np.empty(px.shape + (3,), np.float32)
  for c in range(3):
    rubber = albedo[:, c] * irradiance[c] + sheen
    metal = (albedo[:, c] * (_METAL_DIFFUSE * irradiance[c]
                             + _METAL_MIRROR * mirrored[c])
             + highlight * (0.5 + 0.5 * albedo[:, c]))
    colours[:, c] = np.where(is_metal, metal, rubber)
  return colours


# Material constants, tuned by eye and by pixel statistics against real renders.
_SHARP_HIGHLIGHT = 6.0  # for a lamp of the key light's intensity
_BROAD_HIGHLIGHT = 0.25
_RUBBER_SHEEN = 0.04
_METAL_DIFFUSE = 0.1
_METAL_MIRROR = 0.9

# sRGB encoding of linear values in [0, 1] by table lookup: faster than the
# power law, and 65536 steps are fine enough in the darks.
_SRGB_STEPS = 65535


def _make_srgb_table() -> np.ndarray:
  linear = np.linspace(0, 1, _SRGB_STEPS + 1)
  encoded = np.where(linear <= 0.0031308, 12.92 * linear,
                     1.055 * linear ** (1 / 2.4) - 0.055)
  return np.round(255 * encoded).astype(np.uint8)


_SRGB_TABLE = _make_srgb_table()


def _encode_srgb(linear: np.ndarray) -> np.ndarray:
  index = (np.clip(linear, 0, 1) * _SRGB_STEPS + 0.5).astype(np.int32)
  return _SRGB_TABLE[index]


def _smooth_edges(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Anti-aliasing look: blends label-boundary pixels with their 3x3 mean."""
  height, width = labels.shape
  edge = np.zeros(labels.shape, bool)
  vertical = labels[1:] != labels[:-1]
  horizontal = labels[:, 1:] != labels[:, :-1]
  edge[1:] |= vertical
  edge[:-1] |= vertical
  edge[:, 1:] |= horizontal
  edge[:, :-1] |= horizontal
  rows, cols = np.nonzero(edge)
  mean = np.zeros((len(rows), 3), np.float32)
  for dr in (-1, 0, 1):
    for dc in (-1, 0, 1):
      mean += image[np.clip(rows + dr, 0, height - 1),
                    np.clip(cols + dc, 0, width - 1)]
  image[rows, cols] = 0.5 * image[rows, cols] + mean / 18
  return image


def _shade(objects: _Objects, camera: _Camera, lights, rays, depth, labels,
           config: SceneConfig) -> np.ndarray:
  """The sRGB uint8 image [H, W, 3] of a cast scene."""
  dx, dy, dz = rays
  px = np.float32(camera.position[0]) + depth * dx
  py = np.float32(camera.position[1]) + depth * dy
  pz = np.float32(camera.position[2]) + depth * dz
  on_floor = labels == 0
  pz[on_floor] = 0  # exactly on the floor, whatever the rounding
  points = (px, py, pz)
  visibilities = [
      _light_visibility(objects, camera, labels, points, _disc_samples(
          position, config.key_light_radius if index == 0 else radius,
          config.shadow_samples))
      for index, (position, _, _, radius) in enumerate(lights[:config.shadow_lights])]
  sun = None
  if config.sun_share > 0:
    direction = np.asarray(config.sun_position, np.float64)
    direction /= np.linalg.norm(direction)
    sun_samples = _disc_samples(_SUN_DISTANCE * direction,
                                _SUN_DISTANCE * _SUN_ANGULAR_RADIUS, config.shadow_samples)
    sun = (direction, _light_visibility(objects, camera, labels, points, sun_samples))

  # The floor's shading is computed everywhere (cheap, branch-free); object
  # pixels are then overwritten from compressed arrays of just those pixels.
  # A few light samples leave steps in the penumbra; the floor blurs them.
  sky = (config.ambient * (1 - config.sun_share)
         * (1 - _floor_occlusion(objects, camera, labels, px, py)))
  if sun is not None:
    sky = sky + config.ambient * config.sun_share * _box_blur(sun[1], _PENUMBRA_BLUR)
  floor_light = _floor_irradiance(
      px, py, lights, sky, [_box_blur(v, _PENUMBRA_BLUR) for v in visibilities])
  if config.contact_occlusion > 0:
    contact = _floor_contact(objects, camera, labels, px, py,
                             config.contact_occlusion, config.contact_reach)
    floor_light = [channel * contact for channel in floor_light]
  linear = np.stack([config.floor_albedo * channel for channel in floor_light],
                    axis=-1)
  if config.plain_floor:
    linear[:] = linear.reshape(-1, 3).mean(axis=0)
  on_object = np.flatnonzero(~on_floor)
  if on_object.size:

    def flat(per_pixel: np.ndarray) -> np.ndarray:
      return per_pixel.ravel()[on_object]

    vx, vy, vz = flat(dx), flat(dy), flat(dz)
    inv_len = 1 / np.sqrt(vx * vx + vy * vy + vz * vz)
    linear.reshape(-1, 3)[on_object] = _object_radiance(
        objects, camera, config, lights, flat(labels),
        (flat(px), flat(py), flat(pz)),
        (vx * inv_len, vy * inv_len, vz * inv_len), [flat(v) for v in visibilities],
        None if sun is None else (sun[0], flat(sun[1])))
  return _encode_srgb(_smooth_edges(linear, labels))


def _sample_lights(rng: np.random.Generator, config: SceneConfig):
  jitter = rng.uniform(-config.light_jitter, config.light_jitter,
                       size=(len(config.lights), 3))
  return [(np.asarray(light.position) + offset, np.asarray(light.color),
           light.intensity, light.radius) for light, offset in zip(config.lights, jitter)]


def render_scene(seed: int, config: SceneConfig = SceneConfig()
                 ) -> dict[str, np.ndarray]:
  """Renders the scene of `seed`: the real dataset's record, masks as labels.

  Returns `image` uint8 [H, W, 3]; `labels` uint8 [H, W] (0 background, i the
  object in slot i); per slot (schema.MAX_SLOTS of them) float32 `x`, `y`, `z`
  (centre height), `rotation` (degrees), `visibility`, float32 `pixel_coords`
  [slots, 3] (column, row, depth of the centre's projection), uint8 codes
  `size`, `material`, `shape`, `color`. Slot 0 is the background, then the
  objects in the order they were placed, then empty slots of zeros.
  """
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    # Rays parallel to a slab or a cap divide by zero; inf is the right answer.
    return _render(seed, config)


def _render(seed: int, config: SceneConfig) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  camera_jitter = rng.uniform(-config.camera_jitter, config.camera_jitter, 3)
  camera = _make_camera(np.asarray(config.camera_position) + camera_jitter,
                        config)
  lights = _sample_lights(rng, config)
  count = int(rng.integers(config.min_objects, config.max_objects + 1))
  rays = camera.rays()
  threshold = config.visible_pixel_threshold
  for _ in range(_MAX_SCENE_ATTEMPTS):
    objects = _place_objects(rng, count, config, camera)
    if objects is None:
      continue
    depth, labels = _cast_camera_rays(objects, camera, rays)
    pixels = np.bincount(labels.ravel(), minlength=count + 1)
    if pixels[1:].min() >= threshold:
      break
  else:
    raise RuntimeError(
        f"seed {seed}: no scene of {count} objects with {threshold} visible "
        f"pixels each in {_MAX_SCENE_ATTEMPTS} attempts; loosen the config")
  image = _shade(objects, camera, lights, rays, depth, labels, config)
  return _record(objects, camera, image, labels)


def _record(objects: _Objects, camera: _Camera, image: np.ndarray,
            labels: np.ndarray) -> dict[str, np.ndarray]:
  count = len(objects)
  slots = slice(1, count + 1)
  record = {name: np.zeros(schema.MAX_SLOTS, np.float32)
            for name in schema.FLOAT_FEATURES}
  record.update({name: np.zeros(schema.MAX_SLOTS, np.uint8)
                 for name in schema.CODE_FEATURES})
  record["visibility"][:count + 1] = 1
  record["x"][slots] = objects.x
  record["y"][slots] = objects.y
  record["z"][slots] = objects.half_height
  # float32 may round 359.99999 up to 360: keep the range [0, 360).
  record["rotation"][slots] = np.mod(objects.rotation.astype(np.float32), 360)
  for name in schema.CODE_FEATURES:
    record[name][slots] = getattr(objects, name)
  centres = np.stack([objects.x, objects.y, objects.half_height], axis=-1)
  record["pixel_coords"] = np.zeros((schema.MAX_SLOTS, 3), np.float32)
  record["pixel_coords"][slots] = camera.project(centres)
  record["image"] = image
  record["labels"] = labels
  return record


def render_scenes(seeds: Sequence[int], config: SceneConfig = SceneConfig(),
                  processes: int | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """render_scene for each seed, in order, on `processes` worker processes.

  processes=None uses one per CPU; 1 renders in this process. Workers are
  spawned, not forked, so a caller holding threads (TensorFlow) is safe.
  """
  if processes is not None and processes < 1:
    raise ValueError(f"processes must be >= 1 or None, got {processes}")
  seeds = list(seeds)
  workers = min(processes or os.cpu_count() or 1, len(seeds))
  if workers <= 1:
    yield from (render_scene(seed, config) for seed in seeds)
    return
  chunk = max(1, min(16, len(seeds) // (4 * workers)))
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap(functools.partial(render_scene, config=config), seeds,
                         chunksize=chunk)
