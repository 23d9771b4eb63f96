"""The `clevr_with_masks` record schema and its code conventions, in one place.

Pure Python/NumPy: the renderer, the TFDS builders, the pipeline and the
metrics all read these constants, and none of them may need TensorFlow to.

Facts from DeepMind's reader (`multi_object_datasets/clevr_with_masks.py`):
slot 0 is the background (visibility 1, attribute codes 0), visible objects
come next, empty slots are all zeros; attribute codes are undocumented upstream
and 0 means "none".
"""

from __future__ import annotations

import numpy as np

IMAGE_HEIGHT = 240
IMAGE_WIDTH = 320
MAX_SLOTS = 11  # background + at most 10 objects
MAX_OBJECTS = MAX_SLOTS - 1

# Per-slot float32 features of shape [MAX_SLOTS] (pixel_coords is [MAX_SLOTS, 3]).
FLOAT_FEATURES = ("x", "y", "z", "rotation", "visibility")
# Per-slot uint8 attribute codes, stored upstream as raw bytes of length MAX_SLOTS.
CODE_FEATURES = ("size", "material", "shape", "color")

# Attribute codes. Upstream leaves them undocumented; the shape mapping is the one
# the poster's figures imply (unverified against CLEVR's scene files). The other
# mappings are ours and only matter for the synthetic renderer.
NONE_CODE = 0
SHAPES = {1: "sphere", 2: "cylinder", 3: "cube"}
MATERIALS = {1: "rubber", 2: "metal"}
SIZES = {1: "large", 2: "small"}
# CLEVR's eight colours, in the order of its `properties.json`, as sRGB 0-255.
COLORS = {
    1: ("gray", (87, 87, 87)),
    2: ("red", (173, 35, 35)),
    3: ("blue", (42, 75, 215)),
    4: ("green", (29, 105, 20)),
    5: ("brown", (129, 74, 25)),
    6: ("purple", (129, 38, 192)),
    7: ("cyan", (41, 208, 208)),
    8: ("yellow", (255, 238, 51)),
}

# Semantic classes of the supervised task. Class = shape code (0 is background),
# so the mapping from codes to classes is the identity; it lives here so that a
# dataset with other codes changes one table.
SEMANTIC_CLASSES = ("background", "sphere", "cylinder", "cube")
NUM_SEMANTIC_CLASSES = len(SEMANTIC_CLASSES)
SHAPE_CODE_TO_CLASS = np.array([0, 1, 2, 3], dtype=np.int32)  # index: shape code

# A pixel is "gray" when its RGB channels differ by at most this much (poster's code).
GRAY_TOLERANCE = 10 / 255
# ITU-R BT.601 luminance, as the poster's grayscale conversion.
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)


def labels_to_masks(labels: np.ndarray, num_slots: int = MAX_SLOTS) -> np.ndarray:
  """Instance-label map [H, W] -> official binary masks [num_slots, H, W, 1] (0/255)."""
  slots = np.arange(num_slots, dtype=labels.dtype)[:, None, None]
  return ((labels[None] == slots) * 255).astype(np.uint8)[..., None]


def masks_to_labels(masks: np.ndarray) -> np.ndarray:
  """Official binary masks [S, H, W, 1] -> instance-label map [H, W] (uint8).

  Raises ValueError when the masks do not partition the image (a pixel in no
  mask or in several), since then no label map can hold them exactly.
  """
  binary = masks[..., 0] > 127
  per_pixel = binary.sum(axis=0)
  if not np.all(per_pixel == 1):
    uncovered = int((per_pixel == 0).sum())
    overlapping = int((per_pixel > 1).sum())
    raise ValueError(
        f"masks do not partition the image: {uncovered} pixels in no mask, "
        f"{overlapping} pixels in several masks")
  return np.argmax(binary, axis=0).astype(np.uint8)
