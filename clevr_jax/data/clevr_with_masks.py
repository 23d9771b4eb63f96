"""TFDS builder for DeepMind's `clevr_with_masks`, read from the official TFRecord.

Configs (record ranges of the official file, which has 100,000 records):
  poster  records 0-6999 train, 7000-7999 test (the poster's split); reads only
          the first 8000 records, so it never needs the other 10 GB;
  full    records 0-89,999 train, 90,000-99,999 test;
  clevr6  the `full` ranges, keeping scenes with at most 6 objects (CLEVR6, the
          subset object-discovery papers report on).

The source is the official file in the manual directory, or its public gs://
copy streamed by TensorFlow (`source='gcs'`, for machines that are online).
Examples are stored compactly (image PNG, masks as one label PNG) and each
record is checked on the way in: see `official.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from clevr_jax import schema
from clevr_jax.data import official


def compact_features(height: int, width: int) -> tfds.features.FeaturesDict:
  """The stored form shared by the real and the synthetic builder."""
  s = schema.MAX_SLOTS
  features = {
      "image": tfds.features.Image(shape=(height, width, 3)),
      # Instance labels 0..10 as a one-channel PNG: the 11 binary masks, exactly.
      "labels": tfds.features.Image(shape=(height, width, 1)),
      "pixel_coords": tfds.features.Tensor(shape=(s, 3), dtype=np.float32),
      "index": tfds.features.Scalar(dtype=np.int64),
  }
  for name in schema.FLOAT_FEATURES:
    features[name] = tfds.features.Tensor(shape=(s,), dtype=np.float32)
  for name in schema.CODE_FEATURES:
    features[name] = tfds.features.Tensor(shape=(s,), dtype=np.uint8)
  return tfds.features.FeaturesDict(features)


def to_stored(example: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
  """Compact numpy example (with a [H, W] label map) -> TFDS-encodable dict."""
  stored = {name: example[name] for name in
            ("image", "pixel_coords") + schema.FLOAT_FEATURES + schema.CODE_FEATURES}
  stored["labels"] = example["labels"][..., None]
  stored["index"] = index
  return stored


@dataclasses.dataclass(kw_only=True)
class ClevrWithMasksConfig(tfds.core.BuilderConfig):
  train_records: tuple[int, int] = (0, 7000)
  test_records: tuple[int, int] = (7000, 8000)
  max_objects: int = schema.MAX_OBJECTS


class ClevrWithMasks(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """DeepMind's clevr_with_masks: 240x320 CLEVR renders with instance masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Compact storage: image PNG, masks as one label PNG."}
  BUILDER_CONFIGS = [
      ClevrWithMasksConfig(name="poster", description="Records 0-6999 train, 7000-7999 test."),
      ClevrWithMasksConfig(name="full", train_records=(0, 90_000),
                           test_records=(90_000, 100_000),
                           description="All 100,000 records: 0-89,999 train, 90,000-99,999 test."),
      ClevrWithMasksConfig(name="clevr6", train_records=(0, 90_000),
                           test_records=(90_000, 100_000), max_objects=6,
                           description="The full ranges, scenes with at most 6 objects."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Copy {official.GCS_PATH} (10.5 GB) into the manual directory, e.g. "
      f"`gsutil cp {official.GCS_PATH} <manual_dir>/`.")

  def __init__(self, *, source: str = "manual", **kwargs):
    if source not in ("manual", "gcs"):
      raise ValueError(f"source must be 'manual' or 'gcs', not {source!r}")
    self._source = source
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=compact_features(schema.IMAGE_HEIGHT, schema.IMAGE_WIDTH),
        homepage="https://github.com/deepmind/multi_object_datasets",
        citation="Kabra et al., Multi-Object Datasets, 2019.")

  def source_path(self, manual_dir: str) -> str:
    if self._source == "gcs":
      return official.GCS_PATH
    return f"{manual_dir}/{official.OFFICIAL_FILENAME}"

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # dl_manager.manual_dir asserts with a generic message; ours says what to do.
    path = self.source_path(str(dl_manager._manual_dir))  # pylint: disable=protected-access
    official.check_exists(path)
    return {
        "train": self._generate_examples(path, *self.builder_config.train_records),
        "test": self._generate_examples(path, *self.builder_config.test_records),
    }

  def _generate_examples(self, path: str, start: int, stop: int
                         ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for index, example in official.read_records(path, start, stop):
      if example["visibility"].sum() - 1 > self.builder_config.max_objects:
        continue
      yield index, to_stored(official.to_compact(example, path=path, index=index), index)
