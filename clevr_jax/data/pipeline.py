"""TFDS -> tf.data -> flat per-process host batches of stored fields (uint8).

Determinism across process counts: every process reads the whole split in the
same seeded order, forms the same *global* batches, and keeps its own slice of
each. The composition of a global batch therefore never depends on how many
processes or devices read it, and a run resumes mid-epoch by skipping batches.

Evaluation pads the split with invalid examples to a whole number of global
batches, so no test image is dropped and every process runs the same number of
collective steps (uneven shards make collectives hang).

Training epochs of a split in memory are gathered from its arrays, read once
through tf.data, at the positions of a NumPy permutation drawn from (seed,
epoch), on the host or on the devices; a split too large for memory is
streamed by tf.data (`Split`).

Each host batch is a dict of numpy arrays, this process's slice of a global
batch ([per-process batch, ...]), holding the stored fields of clevr_jax/training/batch.py
(uint8 image and labels, shape codes, visibility, valid, index), or only those
asked for (`fields`): the devices derive the model's inputs and targets from
them inside the jitted steps (`batch.derive`).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from clevr_jax import guards
from clevr_jax import schema
from clevr_jax.data import clevr_with_masks
from clevr_jax.data import official
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
            height=s.get("height", 0) or data.image_height,
            width=s.get("width", 0) or data.image_width,
            min_objects=s.min_objects, max_objects=s.max_objects,
            distinct_colors=bool(s.get("distinct_colors", False)),
            metal=bool(s.get("metal", True)),
            cube_scale=float(s.get("cube_scale", 1.0)),
            shadow_lights=int(s.get("shadow_lights", 1)),
            sun_share=float(s.get("sun_share", 0.0)),
            contact_occlusion=float(s.get("contact_occlusion", 0.0)),
            contact_reach=float(s.get("contact_reach", 0.05)),
            plain_floor=bool(s.get("plain_floor", False)),
            zoom=float(s.get("zoom", 1.0))))
  if data.dataset == "clevr_with_masks":
    if ((data.image_height, data.image_width) != (schema.IMAGE_HEIGHT, schema.IMAGE_WIDTH)
        and not data.get("crop")):
      raise ValueError(
          f"clevr_with_masks images are {schema.IMAGE_HEIGHT}x{schema.IMAGE_WIDTH}; "
          f"config.data.image_height/width ({data.image_height}x{data.image_width}) "
          "can only change the synthetic data, or set the size a crop is resized to "
          "(config.data.crop).")
    names = [c.name for c in clevr_with_masks.ClevrWithMasks.BUILDER_CONFIGS]
    if data.real_config not in names:
      raise ValueError(f"config.data.real_config={data.real_config!r} is not one of {names}")
    return clevr_with_masks.ClevrWithMasks(
        data_dir=data_dir, config=data.real_config, source=data.source)
  raise ValueError(f"config.data.dataset={data.dataset!r} is not one of {DATASETS}")


def prepare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Builds the dataset into data_dir if it is not there yet; returns the builder.

  A build that fails or is interrupted leaves no `incomplete.*` folder behind
  (TFDS builds into one and renames it when done); one left by a killed build
  is removed by the next.
  """
  builder = make_builder(config)
  version_dir = str(builder.data_dir)  # <data_dir>/<name>/<config>/<version>
  root = os.path.dirname(os.path.dirname(os.path.dirname(version_dir)))
  manual_dir = config.data.manual_dir or official.default_manual_dir(root)
  if builder.is_prepared():
    return builder
  # The build writes there (downloads, then the records): say so before it starts.
  guards.check_writable(root, "--config.data.data_dir")
  _remove_incomplete(os.path.dirname(version_dir))
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir), try_download_gcs=False))
  except BaseException:  # KeyboardInterrupt too: nothing half-built stays
    _remove_incomplete(os.path.dirname(version_dir))
    raise
  return builder


def _remove_incomplete(config_dir: str) -> None:
  """TFDS's unfinished build folders (`incomplete.<random>_<version>`) in `config_dir`."""
  if "://" in config_dir or not os.path.isdir(config_dir):
    return
  for name in os.listdir(config_dir):
    if name.startswith("incomplete."):
      shutil.rmtree(os.path.join(config_dir, name), ignore_errors=True)


def _source_dataset(config: ml_collections.ConfigDict, split: str
                    ) -> tuple[tf.data.Dataset, int]:
  """Stored-form examples of a split (only the fields we use), and their count."""
  if split == "test" and config.data.eval_file:
    path = config.data.eval_file
    official.check_eval_file(path)
    height, width = eval_file_size(config)
    examples = [official.to_compact(example, path=path, index=index) | {"index": index}
                for index, example in official.read_records(path, height=height, width=width)]
    if not examples:
      raise ValueError(f"{path}: no records to evaluate on")
    target = (config.data.image_height, config.data.image_width)
    if config.data.get("crop"):
      logging.info("%s: %dx%d images cut to rows %d-%d, columns %d-%d (config.data.crop) "
                   "and resized to %dx%d", path, height, width,
                   *crop_pixels(config.data.crop, height, width), *target)
      examples = [crop_and_resize(e, config.data.crop, *target) for e in examples]
    elif (height, width) != target:
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
  if config.data.get("crop"):
    box, size = config.data.crop, (config.data.image_height, config.data.image_width)
    dataset = dataset.map(lambda e: crop_and_resize(e, box, *size),
                          num_parallel_calls=tf.data.AUTOTUNE)
  return dataset, builder.info.splits[split].num_examples


def eval_file_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The image size of `data.eval_file`: data.eval_file_height/width when given
  (the format stores pixels, not a shape: a 64x48 file has as many pixels as a
  48x64 one), else the configured size when the file's images have that many
  pixels, else the official 240x320."""
  data = config.data
  pixels = official.first_image_size(data.eval_file) // 3
  if data.eval_file_height > 0 and data.eval_file_width > 0:
    if data.eval_file_height * data.eval_file_width == pixels:
      return data.eval_file_height, data.eval_file_width
    raise ValueError(
        f"{data.eval_file}: its images have {pixels} pixels, not the "
        f"{data.eval_file_height}x{data.eval_file_width} of config.data.eval_file_height/"
        "width: give the file's own size there (or 0 and 0 for the configured size)")
  for height, width in [(data.image_height, data.image_width),
                        (schema.IMAGE_HEIGHT, schema.IMAGE_WIDTH)]:
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


def crop_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) in pixels of a height x width image, from `box`'s
  fractions (config.data.crop); ValueError when it is no box inside the image."""
  if len(box) != 4 or not 0 <= box[0] < box[1] <= 1 or not 0 <= box[2] < box[3] <= 1:
    raise ValueError(f"config.data.crop={tuple(box)} is not (top, bottom, left, right) with "
                     "0 <= top < bottom <= 1 and 0 <= left < right <= 1 (fractions of the "
                     "image), e.g. --config.data.crop='(0.12, 0.92, 0.2, 0.8)'")
  top, bottom = round(box[0] * height), round(box[1] * height)
  left, right = round(box[2] * width), round(box[3] * width)
  if bottom <= top or right <= left:
    raise ValueError(f"config.data.crop={tuple(box)} leaves no pixel of a {height}x{width} image")
  return top, bottom, left, right


def crop_and_resize(example: dict, box: Sequence[float], height: int, width: int) -> dict:
  """A stored-form example (one image, tensors or arrays) cut to `box` and resized to
  height x width: the image by area averaging (shrinking) or bilinear, the label
  map by nearest neighbour; objects outside the crop are no longer visible.
  Pure TensorFlow: runs in tf.data's map and eagerly on NumPy arrays alike."""
  image = tf.convert_to_tensor(example["image"])
  labels = tf.convert_to_tensor(example["labels"])
  top, bottom, left, right = crop_pixels(box, image.shape[0], image.shape[1])
  image, labels = image[top:bottom, left:right], labels[top:bottom, left:right]
  if (bottom - top, right - left) != (height, width):
    method = "area" if bottom - top >= height else "bilinear"
    image = tf.image.resize(tf.cast(image, tf.float32), (height, width), method=method)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    labels = tf.image.resize(labels[..., None], (height, width), method="nearest")[..., 0]
  visible = tf.reduce_any(tf.cast(labels, tf.int32)[..., None] == tf.range(schema.MAX_SLOTS),
                          axis=(0, 1))
  visibility = tf.convert_to_tensor(example["visibility"])
  out = dict(example) | {"image": image, "labels": labels,
                         "visibility": tf.where(visible, visibility, tf.zeros_like(visibility))}
  if not tf.executing_eagerly() or isinstance(example["image"], tf.Tensor):
    return out
  return {k: v.numpy() if isinstance(v, tf.Tensor) else v for k, v in out.items()}


def per_device_batch(global_batch: int, process_count: int, local_devices: int,
                     flag: str = "--config.batch_size") -> int:
  """`global_batch` split over all devices; `flag` is the setting an error names."""
  devices = process_count * local_devices
  if global_batch % devices:
    lower = max(devices, global_batch // devices * devices)
    also = (" (and --config.eval.batch_size likewise). The poster used batch 10."
            if flag == "--config.batch_size" else ".")
    raise ValueError(
        f"the global batch {global_batch} does not divide over {devices} devices "
        f"({process_count} process(es) x {local_devices}): set e.g. "
        f"{flag}={lower} or {lower + devices}{also}")
  return global_batch // devices


def per_process_batch(global_batch: int, process_count: int,
                      flag: str = "--config.batch_size") -> int:
  """`global_batch` split over the processes; `flag` is the setting an error names."""
  if global_batch % process_count:
    raise ValueError(
        f"the global batch {global_batch} does not divide over {process_count} processes: "
        f"set {flag} to a multiple of it")
  return global_batch // process_count


def _to_host_batches(global_batches: tf.data.Dataset, config: ml_collections.ConfigDict,
                     global_batch: int, process_index: int, process_count: int,
                     flag: str = "--config.batch_size") -> Iterator[dict[str, np.ndarray]]:
  """Each global batch's slice of this process, flat: [per-process batch, ...]."""
  per_process = per_process_batch(global_batch, process_count, flag)
  start = process_index * per_process
  if process_count > 1:
    global_batches = global_batches.map(
        lambda batch: {k: v[start:start + per_process] for k, v in batch.items()})
  return global_batches.prefetch(config.data.prefetch_batches).as_numpy_iterator()


def _select(dataset: tf.data.Dataset, fields: Sequence[str] | None) -> tf.data.Dataset:
  if fields is None:
    return dataset
  unknown = sorted(set(fields) - set(dataset.element_spec))
  if unknown:
    raise ValueError(f"unknown batch field(s) {unknown}; stored: {sorted(dataset.element_spec)}")
  return dataset.map(lambda e: {k: e[k] for k in fields})


PSEUDO_LABELS = "pseudo_labels"  # attached by `Split.attach_pseudo_masks`, uint8 [b, H, W]


class Split:
  """A split read once, batched per epoch.

  Training has one lane when the split is in memory (config.data.cache, or
  config.data.device_resident): its stored fields are read once into host
  arrays, and each epoch visits them in a NumPy permutation drawn from
  (config.seed, epoch) (`epoch_order`). The host gathers each batch from the
  arrays, or, for a device-resident split, sends only the positions and the
  devices gather (batch.gather): the same batches either way. A split that does
  not fit in memory (config.data.cache=False: the full real dataset on a small
  host) is streamed by tf.data instead, shuffled by its own seeded buffer (a
  different order, as deterministic). Both lanes resume mid-epoch exactly, by
  skipping batches, and attach pseudo-masks in `_attach`.
  """

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    self.config = config
    self.split = split
    dataset, self.num_examples = _source_dataset(config, split)
    # No autotuning: deleting an iterator waits for the autotuner's thread to
    # wake, 10-23 s after an evaluation's slow batches
    # (docs/reports/2026-12-06-segmenters-on-devices.md); the AUTOTUNE maps then
    # run on every core, as fast for these small maps.
    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = dataset.with_options(options)
    self._source = dataset.map(_stored_form, num_parallel_calls=tf.data.AUTOTUNE)
    self._dataset = self._source.cache() if config.data.cache else self._source
    self._arrays: dict[str, np.ndarray] = {}  # the in-memory lane's fields, read on first use
    self._pseudo_masks = None  # a pseudo_masks.PseudoMaskStore, when attached

  @property
  def in_memory(self) -> bool:
    return bool(self.config.data.cache or self.config.data.device_resident)

  def steps_per_epoch(self, global_batch: int) -> int:
    return self.num_examples // global_batch

  def _epoch_seed(self, epoch: int) -> list[int]:
    return [self.config.seed, epoch]

  def _check_train_batch(self) -> int:
    global_batch = self.config.batch_size
    if self.num_examples < global_batch:
      raise ValueError(f"the {self.split} split has {self.num_examples} examples, fewer "
                       f"than one global batch ({global_batch})")
    return global_batch

  def attach_pseudo_masks(self, store) -> None:
    """Training batches carry `PSEUDO_LABELS`, looked up in `store` by 'index'
    (a pseudo_masks.PseudoMaskStore; batches then always hold 'index')."""
    self._pseudo_masks = store
    self._arrays.pop(PSEUDO_LABELS, None)

  def _attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The one place pseudo-masks join the training examples."""
    if self._pseudo_masks is None:
      return batch
    return batch | {PSEUDO_LABELS: self._pseudo_masks.lookup(batch["index"])}

  def _wanted(self, fields: Sequence[str] | None) -> tuple[str, ...]:
    wanted = tuple(self._source.element_spec) if fields is None else tuple(fields)
    if self._pseudo_masks is not None and "index" not in wanted:
      wanted += ("index",)
    return wanted

  def epoch_order(self, epoch: int) -> np.ndarray:
    """int32 [steps per epoch * global batch]: the split positions the in-memory
    lane visits in `epoch`, in order: a permutation drawn from (seed, epoch), the
    same in every process."""
    global_batch = self._check_train_batch()
    order = np.random.default_rng(self._epoch_seed(epoch)).permutation(self.num_examples)
    return order[:self.steps_per_epoch(global_batch) * global_batch].astype(np.int32)

  def train_batches(self, epoch: int, *, skip_batches: int = 0, process_index: int = 0,
                    process_count: int = 1, fields: Sequence[str] | None = None,
                    positions_only: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of shuffled, whole global batches, from batch `skip_batches` on.

    Yields this process's flat slice of each global batch: the stored `fields`
    (all when None), plus `PSEUDO_LABELS` when attached; or, with
    `positions_only` (a device-resident split, `train_arrays` on the devices),
    only the examples' positions in the split ({batch.POSITION: int32 [b]}).
    """
    global_batch = self._check_train_batch()
    per_process = per_process_batch(global_batch, process_count)
    if not self.in_memory:
      if positions_only:
        raise ValueError("a device-resident split is in memory: config.data.device_resident")
      return self._streamed_batches(epoch, skip_batches, process_index, process_count, fields)
    order = self.epoch_order(epoch).reshape(-1, global_batch)
    own = order[skip_batches:, process_index * per_process:(process_index + 1) * per_process]
    if positions_only:
      return ({"position": positions} for positions in own)
    arrays = self.train_arrays(fields)
    return ({k: v[positions] for k, v in arrays.items()} for positions in own)

  def _streamed_batches(self, epoch: int, skip_batches: int, process_index: int,
                        process_count: int, fields: Sequence[str] | None
                        ) -> Iterator[dict[str, np.ndarray]]:
    """The lane for a split that does not fit in memory: tf.data shuffles and batches."""
    global_batch = self._check_train_batch()
    seed = int(np.random.SeedSequence(self._epoch_seed(epoch)).generate_state(1)[0])
    dataset = _select(self._source, self._wanted(fields)).shuffle(
        self.num_examples, seed=seed, reshuffle_each_iteration=False)
    dataset = dataset.batch(global_batch, drop_remainder=True).skip(skip_batches)
    batches = _to_host_batches(dataset, self.config, global_batch, process_index,
                               process_count)
    return (self._attach(batch) for batch in batches)

  def train_arrays(self, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The whole split's `fields` (all when None) in split order, read once and
    kept, plus `PSEUDO_LABELS` when attached: the in-memory lane's examples."""
    wanted = self._wanted(fields)
    missing = [k for k in wanted if k not in self._arrays]
    if missing:
      self._arrays.update(self._read_arrays(missing))
    arrays = {k: self._arrays[k] for k in wanted}
    if self._pseudo_masks is not None:
      if PSEUDO_LABELS not in self._arrays:
        self._arrays[PSEUDO_LABELS] = self._attach(arrays)[PSEUDO_LABELS]
      arrays[PSEUDO_LABELS] = self._arrays[PSEUDO_LABELS]
    return arrays

  def _read_arrays(self, fields: Sequence[str]) -> dict[str, np.ndarray]:
    """The split's stored `fields`, stacked in split order, read from the source
    (not through the evaluation's tf.data cache: the split is not held twice)."""
    chunks = _select(self._source, fields).batch(256).as_numpy_iterator()
    arrays: dict[str, np.ndarray] = {}
    start = 0
    for chunk in chunks:
      for k, v in chunk.items():
        if k not in arrays:
          arrays[k] = np.empty((self.num_examples,) + v.shape[1:], v.dtype)
        arrays[k][start:start + len(v)] = v
      start += len(next(iter(chunk.values())))
    if start != self.num_examples:
      raise ValueError(f"the {self.split} split yielded {start} examples, not the "
                       f"{self.num_examples} its metadata lists: rebuild it")
    return arrays

  def eval_batches(self, *, process_index: int = 0, process_count: int = 1,
                   max_examples: int = 0, fields: Sequence[str] | None = None
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
    dataset = _select(dataset, fields).batch(global_batch, drop_remainder=True)
    return _to_host_batches(dataset, self.config, global_batch, process_index,
                            process_count, flag="--config.eval.batch_size")

  def num_eval_batches(self, max_examples: int = 0) -> int:
    count = min(self.num_examples, max_examples) if max_examples else self.num_examples
    return -(-count // self.config.eval.batch_size)


def _stored_form(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """A source example as the host sends it (batch.STORED): bytes, not floats."""
  return {"image": example["image"], "labels": example["labels"],
          "shape": tf.cast(example["shape"], tf.uint8),
          "visibility": tf.cast(example["visibility"] > 0, tf.uint8),
          "valid": tf.constant(True), "index": tf.cast(example["index"], tf.int32)}
