"""Batches on the devices: what the host sends, and what the devices derive from it.

The host sends per example only what cannot be derived, in its stored form
(`STORED`): the uint8 image, the uint8 instance-label map, the per-slot shape
codes and visibility, validity and index. `derive`, inside the jitted steps,
computes the rest on the devices: the image scaled to [0, 1] (or its
luminance), the gray-pixel map, the semantic target and the oracle K. A
240x320 example is 0.3 MB this way instead of about 2 MB of floats and int32
maps. `fields` says which stored fields a purpose needs, so that, e.g., the
reconstruction step is sent images only.

Each process sends its flat slice of the global batch (`sharding.to_global`).

`DeviceData` keeps a whole split on the devices (`config.data.device_resident`):
the host then sends each step only the positions of its examples, and `gather`
picks them on the devices.

No TensorFlow here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.objects import objectives
from clevr_jax.training import losses

# Stored fields, as the host sends them (leading batch axis b):
#   image       uint8 [b, H, W, 3]   RGB, also for grayscale runs
#   labels      uint8 [b, H, W]      0 background, i = slot i
#   shape       uint8 [b, S]         per-slot shape codes (schema.SHAPES)
#   visibility  uint8 [b, S]         1 for the background and visible objects
#   valid       bool  [b]            False for evaluation padding
#   index       int32 [b]            the example's index in its source
STORED = ("image", "labels", "shape", "visibility", "valid", "index")
PURPOSES = ("train", "eval_loss", "evaluate")
POSITION = "position"  # device-resident data: the examples' positions in the split


def fields(config: ml_collections.ConfigDict, purpose: str) -> tuple[str, ...]:
  """The stored fields a purpose reads.

  train: the train step (images; labels and shapes for the supervised target;
    the index for the object-aware terms, whose pseudo-masks train.py adds as
    'pseudo_labels', uint8 [b, H, W]).
  eval_loss: the test loss and confusion matrix (the same, plus validity).
  evaluate: the segmentation protocol and figures (everything).
  """
  if purpose not in PURPOSES:
    raise ValueError(f"purpose {purpose!r} is not one of {PURPOSES}")
  if purpose == "evaluate":
    return STORED
  needed = ["image"]
  if config.task == "segmentation":
    needed += ["labels", "shape"]
  if purpose == "train" and objectives.enabled(config):
    needed.append("index")  # the object-aware terms draw each example's views by it
  if purpose == "eval_loss":
    needed.append("valid")
  return tuple(needed)


def derive(batch: dict[str, jax.Array], config: ml_collections.ConfigDict
           ) -> dict[str, jax.Array]:
  """Stored fields -> model inputs and targets (jit-friendly; any fields present).

  Returns what can be derived from `batch`:
    image            float32 [b, H, W, C] in [0, 1]; C = 1 (luminance) for grayscale
    gray_mask        bool    [b, H, W]  RGB channels within 10/255 (from the colours)
    instance_labels  int32   [b, H, W]
    semantic         int32   [b, H, W]  0 background, 1 sphere, 2 cylinder, 3 cube
    num_masks        int32   [b]        true masks incl. background (oracle K)
    valid, index     as sent
  Inside a jitted step XLA computes only what the step uses.
  """
  out = {k: v for k, v in batch.items() if k not in ("image", "labels", "shape", "visibility")}
  if "image" in batch:
    rgb = batch["image"]
    # On the integers, exact: no float rounding decides a pixel at the threshold.
    spread = (jnp.max(rgb, -1).astype(jnp.int32) - jnp.min(rgb, -1).astype(jnp.int32))
    out["gray_mask"] = spread <= round(schema.GRAY_TOLERANCE * 255)
    image = rgb.astype(jnp.float32) / 255.0
    out["image"] = losses.to_grayscale(image) if config.data.grayscale else image
  if "labels" in batch:
    labels = batch["labels"].astype(jnp.int32)
    out["instance_labels"] = labels
    if "shape" in batch:
      # Lookups as selects over the few codes and slots, not gathers: they fuse
      # into one elementwise pass, and keep the batch's sharding under plain jit.
      codes = batch["shape"].astype(jnp.int32)
      classes = jnp.zeros_like(codes)  # [b, S]
      for code, cls in enumerate(schema.SHAPE_CODE_TO_CLASS):
        classes = jnp.where(codes == code, int(cls), classes)
      semantic = jnp.zeros_like(labels)
      for slot in range(codes.shape[-1]):
        semantic = jnp.where(labels == slot, classes[:, slot, None, None], semantic)
      out["semantic"] = semantic
  if "visibility" in batch:
    out["num_masks"] = jnp.sum(batch["visibility"].astype(jnp.int32), -1)
  return out


def make_derive(config: ml_collections.ConfigDict
                ) -> Callable[[dict[str, jax.Array]], dict[str, jax.Array]]:
  """`derive` for `config`, jitted: for code outside the steps (evaluation, previews)."""
  return jax.jit(lambda batch: derive(batch, config))


class DeviceData:
  """A whole split's stored fields, replicated on every device of the mesh.

  The split's 8,000 poster images are 2.5 GB as uint8 with their labels: small
  next to an accelerator's memory. Batches are then gathered on the devices
  by position (`gather`), and the host sends only the positions.
  """

  def __init__(self, arrays: dict[str, np.ndarray], mesh: jax.sharding.Mesh):
    self.num_examples = len(next(iter(arrays.values())))
    self.arrays = sharding.replicate(arrays, mesh)

  def nbytes(self) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(self.arrays))


def gather(data: dict[str, jax.Array], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The stored fields of the examples at batch[POSITION], beside the rest of `batch`."""
  if POSITION not in batch:
    return batch
  positions = batch[POSITION]
  picked = {k: jnp.take(v, positions, axis=0) for k, v in data.items()}
  return picked | {k: v for k, v in batch.items() if k != POSITION}


def make_gather(mesh: jax.sharding.Mesh
                ) -> Callable[[dict[str, jax.Array], dict[str, jax.Array]], dict[str, jax.Array]]:
  """`gather` as the train step runs it (each device picks its own examples), jitted."""
  return jax.jit(jax.shard_map(gather, mesh=mesh, in_specs=(P(), P(sharding.AXIS)),
                               out_specs=P(sharding.AXIS)))
