"""Reading and writing records in DeepMind's official `clevr_with_masks` format.

The official file is one GZIP TFRecord. Each byte feature is stored as a
`bytes_list` of one-byte strings (one per element), so `image` is a list of
240*320*3 strings and `mask` of 11*240*320; they decode with `decode_raw`.

Errors name the file and the record and say what to do: a missing file, a
truncated or corrupt file, a record whose features have the wrong shapes, and
masks that do not partition the image.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tensorflow as tf

from clevr_jax import schema

OFFICIAL_FILENAME = "clevr_with_masks_train.tfrecords"
GCS_PATH = "gs://multi-object-datasets/clevr_with_masks/" + OFFICIAL_FILENAME
NUM_OFFICIAL_RECORDS = 100_000
BYTE_FEATURES = ("image", "mask") + schema.CODE_FEATURES


_ONE_BYTE = [bytes([v]) for v in range(256)]


class RecordError(ValueError):
  """A record (or the file holding it) is not in the official format."""


def _feature_spec(height: int, width: int) -> dict[str, tf.io.FixedLenFeature]:
  s = schema.MAX_SLOTS
  spec = {
      "image": tf.io.FixedLenFeature([height, width, 3], tf.string),
      "mask": tf.io.FixedLenFeature([s, height, width, 1], tf.string),
      "pixel_coords": tf.io.FixedLenFeature([s, 3], tf.float32),
  }
  for name in schema.FLOAT_FEATURES:
    spec[name] = tf.io.FixedLenFeature([s], tf.float32)
  for name in schema.CODE_FEATURES:
    spec[name] = tf.io.FixedLenFeature([s], tf.string)
  return spec


def parse_record(serialized: tf.Tensor, height: int = schema.IMAGE_HEIGHT,
                 width: int = schema.IMAGE_WIDTH) -> dict[str, tf.Tensor]:
  """One serialized official record -> its features, bytes decoded to uint8."""
  example = tf.io.parse_single_example(serialized, _feature_spec(height, width))
  for name in BYTE_FEATURES:
    example[name] = tf.squeeze(tf.io.decode_raw(example[name], tf.uint8), -1)
  return example


def serialize_record(example: dict[str, np.ndarray]) -> bytes:
  """Official-schema arrays -> one serialized record (the inverse of parse_record)."""

  def one_byte_strings(array: np.ndarray) -> tf.train.Feature:
    flat = np.asarray(array, dtype=np.uint8).reshape(-1).tolist()
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[_ONE_BYTE[v] for v in flat]))

  def floats(array: np.ndarray) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(
        value=np.asarray(array, np.float32).reshape(-1)))

  feature = {name: one_byte_strings(example[name]) for name in BYTE_FEATURES}
  feature["pixel_coords"] = floats(example["pixel_coords"])
  for name in schema.FLOAT_FEATURES:
    feature[name] = floats(example[name])
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString()


def write_records(path: str, examples: list[dict[str, np.ndarray]]) -> None:
  """Writes official-schema examples as a GZIP TFRecord, like the official file."""
  with tf.io.TFRecordWriter(path, options="GZIP") as writer:
    for example in examples:
      writer.write(serialize_record(example))


def check_exists(path: str) -> None:
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"no clevr_with_masks TFRecord at {path!r}. Download the official file "
        f"({GCS_PATH}, 10.5 GB; e.g. `gsutil cp {GCS_PATH} DIR/`) and point "
        "--config.data.manual_dir at DIR, or stream it with "
        "--config.data.source=gcs on a machine that is online, or use the "
        "synthetic data with a ':synthetic' or ':quick' preset.")


_GZIP_MAGIC = b"\x1f\x8b"


def check_gzip(path: str) -> None:
  """The official format is a GZIP TFRecord; a plain one would read as 'corrupt'."""
  with tf.io.gfile.GFile(path, "rb") as f:
    head = f.read(2)
  if head and head != _GZIP_MAGIC:
    raise RecordError(
        f"{path} is not GZIP-compressed: clevr_with_masks files are GZIP TFRecords. "
        "Compress it (`gzip -c FILE > FILE.gz`, then use FILE.gz) or write it with "
        "tf.io.TFRecordWriter(path, options='GZIP').")


def check_eval_file(path: str) -> None:
  """--config.data.eval_file: an existing GZIP file (not the official file's download advice)."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"--config.data.eval_file={path} does not exist: give the path of a GZIP "
        "TFRecord of official-format records (docs/reference/data_and_pipeline.md), "
        "or '' to evaluate on the dataset's test split.")
  if tf.io.gfile.isdir(path):
    raise ValueError(
        f"--config.data.eval_file={path} is a directory: give the TFRecord file in it.")
  check_gzip(path)


def _image_size_hint(path: str, height: int, width: int) -> str:
  """The size of the first record's images, when it is not height x width."""
  try:
    raw = next(iter(tf.data.TFRecordDataset(path, compression_type="GZIP").take(1)))
    example = tf.train.Example.FromString(raw.numpy())
    pixels = len(example.features.feature["image"].bytes_list.value) // 3
  except Exception:  # pylint: disable=broad-except  (only a hint)
    return ""
  if not pixels or pixels == height * width:
    return ""
  # Same aspect ratio as the configured size (240x320 for clevr_with_masks)?
  h = round((pixels * height / width) ** 0.5)
  size = f"{h}x{pixels // h}" if h and pixels % h == 0 else f"{pixels} pixels"
  return (f" Its images are {size}, not {height}x{width}: set "
          "--config.data.image_height and --config.data.image_width to their size.")


def first_image_size(path: str) -> int:
  """The number of image bytes (height * width * 3) of the file's first record."""
  check_exists(path)
  check_gzip(path)
  try:
    for serialized in tf.data.TFRecordDataset(path, compression_type="GZIP").take(1):
      example = tf.io.parse_single_example(
          serialized, {"image": tf.io.VarLenFeature(tf.string)})
      return int(tf.shape(example["image"].values)[0])
  except tf.errors.DataLossError as e:  # not a TFRecord inside the GZIP, or cut short
    raise RecordError(
        f"{path}: record 0 is truncated or corrupt ({e.message.splitlines()[0]}): it is "
        "not a complete GZIP TFRecord. Write it again (or download it again).") from None
  except tf.errors.InvalidArgumentError as e:  # a TFRecord of other records
    raise RecordError(f"{path}: record 0 has no 'image' bytes feature "
                      f"({e.message.splitlines()[0]}): is this a clevr_with_masks "
                      "TFRecord?") from None
  raise RecordError(f"{path}: no records")


def read_records(path: str, start: int = 0, stop: int | None = None,
                 height: int = schema.IMAGE_HEIGHT,
                 width: int = schema.IMAGE_WIDTH,
                 ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields (record index, official-schema numpy arrays) for records [start, stop).

  Reads sequentially and stops at `stop`, so the first 8000 records of the
  10.5 GB file (or of its gs:// copy) are read without reading the rest.
  """
  check_exists(path)
  check_gzip(path)
  dataset = tf.data.TFRecordDataset(path, compression_type="GZIP")
  dataset = dataset.skip(start)
  if stop is not None:
    dataset = dataset.take(stop - start)
  dataset = dataset.map(lambda r: parse_record(r, height, width),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  index = start
  iterator = iter(dataset)
  while True:
    try:
      example = next(iterator)
    except StopIteration:
      return
    except tf.errors.DataLossError as e:
      raise RecordError(
          f"{path}: record {index} is truncated or corrupt ({e.message.splitlines()[0]}). "
          "The file is damaged: download it again.") from None
    except tf.errors.InvalidArgumentError as e:
      hint = _image_size_hint(path, height, width) if index == 0 else ""
      raise RecordError(
          f"{path}: record {index} is not a clevr_with_masks record of "
          f"{height}x{width} images with {schema.MAX_SLOTS} slots "
          f"({e.message.splitlines()[0]})."
          + (hint or " Is this the official file?")) from None
    yield index, {k: v.numpy() for k, v in example.items()}
    index += 1


def to_compact(example: dict[str, np.ndarray], *, path: str = "",
               index: int = -1) -> dict[str, np.ndarray]:
  """Official schema -> the stored form: the 11 masks folded into one label map.

  The masks of clevr_with_masks partition the image, so the label map holds
  them exactly; a record where they do not is named in the error.
  """
  try:
    labels = schema.masks_to_labels(example["mask"])
  except ValueError as e:
    raise RecordError(f"{path}: record {index}: {e}; cannot store it as a "
                      "label map") from None
  compact = {k: v for k, v in example.items() if k != "mask"}
  compact["labels"] = labels
  return compact


def expand_official(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Stored form -> official schema in tf.data: the label map back to 11 masks."""
  example = dict(example)
  labels = example.pop("labels")
  if labels.shape.rank == 3:  # TFDS images keep a channel axis
    labels = labels[..., 0]
  # tf.range has no uint8 kernel, and labels are uint8 (a PNG's dtype).
  slots = tf.cast(tf.range(schema.MAX_SLOTS), labels.dtype)[:, None, None]
  masks = tf.cast(labels[None] == slots, tf.uint8) * 255
  example["mask"] = masks[..., None]
  return example


def default_manual_dir(data_dir: str) -> str:
  return os.path.join(data_dir, "downloads", "manual")
