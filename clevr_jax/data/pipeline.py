"""TFDS -> tf.data -> host batches shaped [local_devices, per_device_batch, ...].

Determinism across process counts: every process reads the whole split in the
same seeded order, forms the same *global* batches, and keeps its own slice of
each. The composition of a global batch therefore never depends on how many
processes or devices read it, and a run resumes mid-epoch by skipping batches.

Evaluation pads the split with invalid examples to a whole number of global
batches, so no test image is dropped and every process runs the same number of
collective steps (uneven shards make collectives hang).

Each host batch is a dict of numpy arrays:
  image            float32 [D, b, H, W, C] in [0, 1]; C = 1 for grayscale
  gray_mask        bool    [D, b, H, W]  RGB channels within 10/255 (the source's)
  instance_labels  int32   [D, b, H, W]  0 background, i = slot i
  num_masks        int32   [D, b]        true masks incl. background (oracle K)
  semantic         int32   [D, b, H, W]  0 background, 1 sphere, 2 cylinder, 3 cube
  valid            bool    [D, b]        False for evaluation padding
  index            int64   [D, b]        the example's index in its source
"""

from __future__ import annotations

import os
from typing import Iterator

os.environ.setdefault("NO_GCE_CHECK", "true")  # no metadata-server probes offline

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from clevr_jax.data import clevr_with_masks
from clevr_jax.data import official
from clevr_jax import schema
from clevr_jax.data import synthetic_clevr

# JAX owns the accelerators: TensorFlow only reads data, on the CPU.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # devices already initialised elsewhere; nothing to hide then
  pass

DATASETS = ("synthetic_clevr", "clevr_with_masks")
# What the model and metrics need from a stored example.
_KEPT = ("image", "labels", "shape", "visibility", "index")


def make_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder the config names (not yet prepared)."""
  data = config.data
  data_dir = os.path.expanduser(data.data_dir) if data.data_dir else None
  if data.dataset == "synthetic_clevr":
    s = data.synthetic
    return synthetic_clevr.SyntheticClevr(
        data_dir=data_dir,
        config=synthetic_clevr.make_config(
            seed=s.seed, num_train=s.num_train, num_test=s.num_test,
            height=data.image_height, width=data.image_width,
            min_objects=s.min_objects, max_objects=s.max_objects))
  if data.dataset == "clevr_with_masks":
    if (data.image_height, data.image_width) != (schema.IMAGE_HEIGHT, schema.IMAGE_WIDTH):
      raise ValueError(
          f"clevr_with_masks images are {schema.IMAGE_HEIGHT}x{schema.IMAGE_WIDTH}; "
          f"config.data.image_height/width ({data.image_height}x{data.image_width}) "
          "can only change the synthetic data.")
    names = [c.name for c in clevr_with_masks.ClevrWithMasks.BUILDER_CONFIGS]
    if data.real_config not in names:
      raise ValueError(f"config.data.real_config={data.real_config!r} is not one of {names}")
    return clevr_with_masks.ClevrWithMasks(
        data_dir=data_dir, config=data.real_config, source=data.source)
  raise ValueError(f"config.data.dataset={data.dataset!r} is not one of {DATASETS}")


def prepare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Builds the dataset into data_dir if it is not there yet; returns the builder."""
  builder = make_builder(config)
  manual_dir = config.data.manual_dir or official.default_manual_dir(
      os.path.dirname(os.path.dirname(os.path.dirname(str(builder.data_dir)))))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir), try_download_gcs=False))
  return builder


def _source_dataset(config: ml_collections.ConfigDict, split: str
                    ) -> tuple[tf.data.Dataset, int]:
  """Stored-form examples of a split (only the fields we use), and their count."""
  if split == "test" and config.data.eval_file:
    path = config.data.eval_file
    height, width = eval_file_size(config)
    examples = [official.to_compact(example, path=path, index=index) | {"index": index}
                for index, example in official.read_records(path, height=height, width=width)]
    if not examples:
      raise ValueError(f"{path}: no records to evaluate on")
    target = (config.data.image_height, config.data.image_width)
    if (height, width) != target:
      logging.info("%s: %dx%d images resized to the configured %dx%d (image: %s, masks: "
                   "nearest)", path, height, width, *target,
                   "area" if height >= target[0] else "bilinear")
      examples = [resize_compact(e, *target) for e in examples]
    columns = {k: np.stack([e[k] for e in examples]) for k in _KEPT}
    return tf.data.Dataset.from_tensor_slices(columns), len(examples)
  builder = make_builder(config)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"the dataset {builder.name}/{builder.builder_config.name} is not prepared "
        f"in {builder.data_dir}: run `python -m clevr_jax.main --mode=prepare "
        "--config=...` first (training prepares it too).")
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               read_config=tfds.ReadConfig(add_tfds_id=False))
  dataset = dataset.map(lambda e: {k: e[k] for k in _KEPT},
                        num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.map(lambda e: e | {"labels": e["labels"][..., 0]})
  return dataset, builder.info.splits[split].num_examples


def eval_file_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The image size of `data.eval_file`: the configured one when the file's images
  have that many pixels, else data.eval_file_height/width, else the official 240x320."""
  data = config.data
  pixels = official.first_image_size(data.eval_file) // 3
  candidates = [(data.image_height, data.image_width),
                (data.eval_file_height, data.eval_file_width),
                (schema.IMAGE_HEIGHT, schema.IMAGE_WIDTH)]
  for height, width in candidates:
    if height * width == pixels:
      return height, width
  raise ValueError(
      f"{data.eval_file}: its images have {pixels} pixels, neither the configured "
      f"{data.image_height}x{data.image_width} nor the official "
      f"{schema.IMAGE_HEIGHT}x{schema.IMAGE_WIDTH}: give their size with "
      "--config.data.eval_file_height=H --config.data.eval_file_width=W")


def resize_compact(example: dict[str, np.ndarray], height: int, width: int
                   ) -> dict[str, np.ndarray]:
  """A stored-form example brought to height x width: the image by area averaging
  (when shrinking) or bilinear (when enlarging), the label map by nearest
  neighbour; objects that vanish are no longer visible."""
  image = example["image"]
  method = "area" if image.shape[0] >= height else "bilinear"
  resized = tf.image.resize(tf.cast(image, tf.float32), (height, width), method=method)
  labels = tf.image.resize(example["labels"][..., None], (height, width), method="nearest")
  labels = labels.numpy()[..., 0].astype(example["labels"].dtype)
  visible = np.isin(np.arange(schema.MAX_SLOTS), labels)
  return example | {
      "image": np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8),
      "labels": labels,
      "visibility": np.where(visible, example["visibility"], 0).astype(
          example["visibility"].dtype)}


def preprocess(batch: dict[str, tf.Tensor], grayscale: bool) -> dict[str, tf.Tensor]:
  """Stored form (any leading batch dims) -> model inputs and targets."""
  rgb = batch["image"]
  spread = tf.reduce_max(rgb, -1) - tf.reduce_min(rgb, -1)  # exact on uint8
  image = tf.cast(rgb, tf.float32) / 255.0
  if grayscale:
    image = tf.tensordot(image, tf.constant(schema.LUMINANCE_WEIGHTS), 1)[..., None]
  labels = tf.cast(batch["labels"], tf.int32)
  shape_classes = tf.gather(tf.constant(schema.SHAPE_CODE_TO_CLASS),
                            tf.cast(batch["shape"], tf.int32))
  semantic = tf.gather(shape_classes, labels, batch_dims=labels.shape.rank - 2)
  return {
      "image": image,
      "gray_mask": spread <= round(schema.GRAY_TOLERANCE * 255),
      "instance_labels": labels,
      "num_masks": tf.cast(tf.reduce_sum(batch["visibility"], -1), tf.int32),
      "semantic": semantic,
      "valid": batch["valid"],
      "index": batch["index"],
  }


def per_device_batch(global_batch: int, process_count: int, local_devices: int) -> int:
  devices = process_count * local_devices
  if global_batch % devices:
    lower = max(devices, global_batch // devices * devices)
    raise ValueError(
        f"the global batch {global_batch} does not divide over {devices} devices "
        f"({process_count} process(es) x {local_devices}): set e.g. "
        f"--config.batch_size={lower} or {lower + devices} (and "
        "--config.eval.batch_size likewise). The poster used batch 10.")
  return global_batch // devices


def _to_host_batches(global_batches: tf.data.Dataset, config: ml_collections.ConfigDict,
                     global_batch: int, process_index: int, process_count: int,
                     local_devices: int) -> Iterator[dict[str, np.ndarray]]:
  per_device = per_device_batch(global_batch, process_count, local_devices)
  per_process = per_device * local_devices
  start = process_index * per_process

  def own_slice(batch):
    batch = {k: v[start:start + per_process] for k, v in batch.items()}
    batch = preprocess(batch, config.data.grayscale)
    return {k: tf.reshape(v, [local_devices, per_device] + v.shape[1:].as_list())
            for k, v in batch.items()}

  dataset = global_batches.map(own_slice, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(config.data.prefetch_batches).as_numpy_iterator()


class Split:
  """A split read once (and cached in memory when configured), batched per epoch."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    self.config = config
    self.split = split
    dataset, self.num_examples = _source_dataset(config, split)
    dataset = dataset.map(lambda e: e | {"valid": tf.constant(True)})
    self._dataset = dataset.cache() if config.data.cache else dataset

  def steps_per_epoch(self, global_batch: int) -> int:
    return self.num_examples // global_batch

  def train_batches(self, epoch: int, *, skip_batches: int = 0, process_index: int = 0,
                    process_count: int = 1, local_devices: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of shuffled, whole global batches, from batch `skip_batches` on."""
    global_batch = self.config.batch_size
    if self.num_examples < global_batch:
      raise ValueError(f"the {self.split} split has {self.num_examples} examples, fewer "
                       f"than one global batch ({global_batch})")
    seed = int(np.random.SeedSequence([self.config.seed, epoch]).generate_state(1)[0])
    dataset = self._dataset.shuffle(self.num_examples, seed=seed,
                                    reshuffle_each_iteration=False)
    dataset = dataset.batch(global_batch, drop_remainder=True).skip(skip_batches)
    return _to_host_batches(dataset, self.config, global_batch, process_index,
                            process_count, local_devices)

  def eval_batches(self, *, process_index: int = 0, process_count: int = 1,
                   local_devices: int = 1, max_examples: int = 0
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Every example in order, padded with invalid ones to whole global batches."""
    global_batch = self.config.eval.batch_size
    count = min(self.num_examples, max_examples) if max_examples else self.num_examples
    dataset = self._dataset.take(count)
    padding = -count % global_batch
    if padding:
      blank = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                    dataset.element_spec)
      dataset = dataset.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    dataset = dataset.batch(global_batch, drop_remainder=True)
    return _to_host_batches(dataset, self.config, global_batch, process_index,
                            process_count, local_devices)

  def num_eval_batches(self, max_examples: int = 0) -> int:
    count = min(self.num_examples, max_examples) if max_examples else self.num_examples
    return -(-count // self.config.eval.batch_size)
