"""Tests of clevr_jax.data: TFDS builders, the official record format, the pipeline.

Every dataset is built once per module into a pytest temporary directory. The
real builder reads a tiny official-format file the tests write themselves
(rendered scenes plus the two real samples), so no download is needed.
"""

import itertools
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from clevr_jax.training import batch as batch_lib

from clevr_jax import defaults
from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.data import clevr_with_masks
from clevr_jax.data import official
from clevr_jax.data import pipeline
from clevr_jax.data import renderer
from clevr_jax.data import synthetic_clevr

tfds.disable_progress_bar()

# Two real records, kept in the repository (see their README for licence and source).
_SAMPLES = pathlib.Path(__file__).resolve().parent / "data" / "clevr_with_masks_samples"
# A tiny record range of the official file, like the poster's 0-6999 / 7000-7999.
_REAL_TRAIN = (0, 5)
_REAL_TEST = (5, 8)
_REAL_SAMPLE_INDICES = {0: 0, 5: 1}  # record index -> real sample number
_FLOATS_AND_CODES = (("pixel_coords",) + schema.FLOAT_FEATURES
                     + schema.CODE_FEATURES)


# ----------------------------------------------------------------- helpers


def _test_config(data_dir, **data_overrides):
  config = defaults.get_config("test")
  config.data.data_dir = str(data_dir)
  for name, value in data_overrides.items():
    setattr(config.data, name, value)
  return config


def _build_synthetic(config, processes):
  """Builds the config's synthetic dataset as make_builder names it."""
  s = config.data.synthetic
  builder = synthetic_clevr.SyntheticClevr(
      data_dir=config.data.data_dir,
      config=synthetic_clevr.make_config(
          seed=s.seed, num_train=s.num_train, num_test=s.num_test,
          height=config.data.image_height, width=config.data.image_width,
          min_objects=s.min_objects, max_objects=s.max_objects,
          processes=processes))
  builder.download_and_prepare()
  return builder


def _examples(builder, split, expand=False):
  """A split's stored examples as numpy dicts, in the builder's file order."""
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  if expand:
    dataset = dataset.map(official.expand_official)
  return list(tfds.as_numpy(dataset))


def _official_example(scene):
  """A renderer scene (label map) -> official-schema arrays (11 binary masks)."""
  example = {k: v for k, v in scene.items() if k != "labels"}
  example["mask"] = schema.labels_to_masks(scene["labels"])
  return example


def _rendered(seed, min_objects, max_objects, height=240, width=320):
  return _official_example(renderer.render_scene(seed, renderer.SceneConfig(
      height=height, width=width, min_objects=min_objects,
      max_objects=max_objects)))


def _real_sample(number):
  """A real record: its image and masks, no attributes, visibility from masks."""
  with np.load(_SAMPLES / f"sample_{number}.npz") as f:
    image, mask = f["image"], f["mask"]
  example = {name: np.zeros(schema.MAX_SLOTS, np.float32)
             for name in schema.FLOAT_FEATURES}
  example.update({name: np.zeros(schema.MAX_SLOTS, np.uint8)
                  for name in schema.CODE_FEATURES})
  example["pixel_coords"] = np.zeros((schema.MAX_SLOTS, 3), np.float32)
  example["visibility"] = mask.any(axis=(1, 2, 3)).astype(np.float32)
  example["image"], example["mask"] = image, mask
  return example


def _objects(example):
  return int(example["visibility"].sum()) - 1


def _build_real(data_dir, manual_dir, name, **ranges):
  builder = clevr_with_masks.ClevrWithMasks(
      data_dir=str(data_dir),
      config=clevr_with_masks.ClevrWithMasksConfig(name=name, **ranges))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), try_download_gcs=False))
  return builder


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for step, (a, e) in enumerate(zip(actual, expected)):
    assert a.keys() == e.keys()
    for name in e:
      np.testing.assert_array_equal(a[name], e[name], err_msg=f"{step}:{name}")


def _concat_processes(shards):
  """Per-process batch lists -> global batches, process 0's slice first."""
  return [{k: np.concatenate([b[k] for b in step]) for k in step[0]}
          for step in zip(*shards)]


def _derived(batch, config):
  """Stored host fields -> inputs and targets as the steps derive them on the devices."""
  out = batch_lib.make_derive(config)({k: jnp.asarray(v) for k, v in batch.items()})
  return {k: np.asarray(v) for k, v in out.items()}


def _tf_preprocess(batch, grayscale):
  """The targets derived on the host in tf.data, written independently of
  `batch.derive`: the reference it must match."""
  batch = {k: tf.constant(v) for k, v in batch.items()}
  rgb = batch["image"]
  spread = tf.reduce_max(rgb, -1) - tf.reduce_min(rgb, -1)  # exact on uint8
  image = tf.cast(rgb, tf.float32) / 255.0
  if grayscale:
    image = tf.tensordot(image, tf.constant(schema.LUMINANCE_WEIGHTS), 1)[..., None]
  labels = tf.cast(batch["labels"], tf.int32)
  shape_classes = tf.gather(tf.constant(schema.SHAPE_CODE_TO_CLASS),
                            tf.cast(batch["shape"], tf.int32))
  semantic = tf.gather(shape_classes, labels, batch_dims=labels.shape.rank - 2)
  out = {"image": image, "gray_mask": spread <= round(schema.GRAY_TOLERANCE * 255),
         "instance_labels": labels,
         "num_masks": tf.cast(tf.reduce_sum(tf.cast(batch["visibility"], tf.float32), -1),
                              tf.int32),
         "semantic": semantic, "valid": batch["valid"], "index": batch["index"]}
  return {k: v.numpy() for k, v in out.items()}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """The test preset's dataset, built in this process; (config, builder)."""
  config = _test_config(tmp_path_factory.mktemp("synthetic"))
  return config, _build_synthetic(config, processes=1)


@pytest.fixture(scope="module")
def stored(synthetic):
  """The synthetic splits' stored examples, by split then index."""
  _, builder = synthetic
  return {split: {int(e["index"]): e for e in _examples(builder, split)}
          for split in ("train", "test")}


@pytest.fixture(scope="module")
def real_records(tmp_path_factory):
  """A tiny official-format file: (manual_dir, the records written, in order).

  Scenes of 10 objects (every slot used), of few objects, of exactly 6 (the
  clevr6 boundary) and of many, and the two real samples, so that the clevr6
  filter has scenes to keep and to drop in both splits.
  """
  records = [_real_sample(0), _rendered(0, 10, 10), _rendered(1, 3, 5),
             _rendered(2, 6, 6), _rendered(3, 7, 9),
             _real_sample(1), _rendered(4, 3, 5), _rendered(5, 10, 10)]
  assert len(records) == _REAL_TEST[1]
  manual_dir = tmp_path_factory.mktemp("manual")
  official.write_records(str(manual_dir / official.OFFICIAL_FILENAME), records)
  return manual_dir, records


@pytest.fixture(scope="module")
def real_builder(real_records, tmp_path_factory):
  manual_dir, _ = real_records
  return _build_real(tmp_path_factory.mktemp("real"), manual_dir, "tiny",
                     train_records=_REAL_TRAIN, test_records=_REAL_TEST)


# ------------------------------------------------------ synthetic builder


def test_synthetic_split_sizes_and_indices(synthetic, stored):
  config, builder = synthetic
  s = config.data.synthetic
  assert builder.info.splits["train"].num_examples == s.num_train
  assert builder.info.splits["test"].num_examples == s.num_test
  assert sorted(stored["train"]) == list(range(s.num_train))
  assert sorted(stored["test"]) == list(range(s.num_test))


def test_synthetic_features_and_dtypes(synthetic, stored):
  config, _ = synthetic
  h, w, slots = config.data.image_height, config.data.image_width, schema.MAX_SLOTS
  expected = {"image": ((h, w, 3), np.uint8), "labels": ((h, w, 1), np.uint8),
              "pixel_coords": ((slots, 3), np.float32), "index": ((), np.int64)}
  expected.update({name: ((slots,), np.float32) for name in schema.FLOAT_FEATURES})
  expected.update({name: ((slots,), np.uint8) for name in schema.CODE_FEATURES})
  for example in list(stored["train"].values()) + list(stored["test"].values()):
    actual = {k: (np.shape(v), np.asarray(v).dtype) for k, v in example.items()}
    assert actual == expected


def test_synthetic_stores_exactly_what_the_renderer_draws(synthetic, stored):
  config, _ = synthetic
  s = config.data.synthetic
  scene_config = renderer.SceneConfig(
      height=config.data.image_height, width=config.data.image_width,
      min_objects=s.min_objects, max_objects=s.max_objects)
  for split in ("train", "test"):
    for index, example in stored[split].items():
      scene = renderer.render_scene(
          synthetic_clevr.scene_seed(s.seed, split, index), scene_config)
      np.testing.assert_array_equal(example["labels"][..., 0], scene["labels"])
      for name in ("image",) + _FLOATS_AND_CODES:
        np.testing.assert_array_equal(example[name], scene[name],
                                      err_msg=f"{split} {index} {name}")
      assert s.min_objects <= _objects(example) <= s.max_objects


def test_synthetic_reads_back_in_the_official_schema(synthetic, stored):
  config, builder = synthetic
  h, w = config.data.image_height, config.data.image_width
  expanded = _examples(builder, "test", expand=True)
  assert len(expanded) == config.data.synthetic.num_test
  for example in expanded:
    assert "labels" not in example
    mask = example["mask"]
    assert mask.shape == (schema.MAX_SLOTS, h, w, 1) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask.astype(np.int64).sum(0), 255)  # a partition
    labels = stored["test"][int(example["index"])]["labels"][..., 0]
    for slot in range(schema.MAX_SLOTS):
      np.testing.assert_array_equal(mask[slot, ..., 0] == 255, labels == slot)
    # The non-empty slots are exactly the visible ones (background included).
    np.testing.assert_array_equal(mask.any(axis=(1, 2, 3)),
                                  example["visibility"] == 1)


@pytest.mark.parametrize("setting, value", [
    ("synthetic.seed", 1), ("synthetic.num_train", 33), ("synthetic.num_test", 13),
    ("image_height", 40), ("image_width", 56), ("synthetic.min_objects", 2),
    ("synthetic.max_objects", 5), ("synthetic.cube_scale", 0.7071),
    ("synthetic.shadow_lights", 3), ("synthetic.sun_share", 1.0),
    ("synthetic.contact_occlusion", 0.2), ("synthetic.zoom", 1.5)])
def test_any_setting_change_names_another_dataset(synthetic, setting, value):
  config, builder = synthetic
  changed = _test_config(config.data.data_dir)
  owner, _, field = setting.rpartition(".")
  target = getattr(changed.data, owner) if owner else changed.data
  assert getattr(target, field) != value
  setattr(target, field, value)
  other = pipeline.make_builder(changed)
  assert other.builder_config.name != builder.builder_config.name
  assert other.data_dir != builder.data_dir
  assert builder.is_prepared() and not other.is_prepared()  # old data not reused


@pytest.mark.slow  # two worker processes
def test_synthetic_build_is_deterministic_across_dirs_and_workers(
    synthetic, tmp_path):
  config, builder = synthetic
  again = _build_synthetic(_test_config(tmp_path), processes=2)
  assert again.builder_config.name == builder.builder_config.name
  assert again.data_dir != builder.data_dir
  for split in ("train", "test"):
    first, second = _examples(builder, split), _examples(again, split)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):  # same examples in the same file order
      assert a.keys() == b.keys()
      for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ----------------------------------------------------------- real builder


def test_real_builder_round_trips_the_official_records(real_builder, real_records):
  _, records = real_records
  for split, (start, stop) in (("train", _REAL_TRAIN), ("test", _REAL_TEST)):
    assert real_builder.info.splits[split].num_examples == stop - start
    examples = {int(e["index"]): e
                for e in _examples(real_builder, split, expand=True)}
    assert sorted(examples) == list(range(start, stop))
    for index, example in examples.items():
      written = records[index]
      assert example.keys() == written.keys() | {"index"}
      for name in written:
        np.testing.assert_array_equal(example[name], written[name],
                                      err_msg=f"record {index}: {name}")


def test_real_samples_masks_round_trip_exactly(real_builder):
  examples = {int(e["index"]): e for split in ("train", "test")
              for e in _examples(real_builder, split, expand=True)}
  for index, number in _REAL_SAMPLE_INDICES.items():
    with np.load(_SAMPLES / f"sample_{number}.npz") as sample:
      np.testing.assert_array_equal(examples[index]["mask"], sample["mask"])
      np.testing.assert_array_equal(examples[index]["image"], sample["image"])
    # Background + 7 objects in sample 0, + 8 in sample 1 (the samples' README).
    assert _objects(examples[index]) == 7 + number


def test_clevr6_filter_drops_scenes_with_more_objects(real_records, tmp_path):
  manual_dir, records = real_records
  builder = _build_real(tmp_path, manual_dir, "tiny6", train_records=_REAL_TRAIN,
                        test_records=_REAL_TEST, max_objects=6)
  for split, (start, stop) in (("train", _REAL_TRAIN), ("test", _REAL_TEST)):
    kept = [i for i in range(start, stop) if _objects(records[i]) <= 6]
    assert 0 < len(kept) < stop - start  # the split has scenes of both kinds
    indices = sorted(int(e["index"]) for e in _examples(builder, split))
    assert indices == kept
    assert builder.info.splits[split].num_examples == len(kept)


# ------------------------------------------------------------ clear errors


def test_missing_official_file_says_where_and_what_to_do(tmp_path):
  config = defaults.get_config()  # the real dataset, default manual_dir
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError) as error:
    pipeline.prepare(config)
  message = str(error.value)
  expected_path = tmp_path / "downloads" / "manual" / official.OFFICIAL_FILENAME
  assert str(expected_path) in message
  assert "manual_dir" in message and ":synthetic" in message


def test_missing_eval_file_names_it(synthetic, tmp_path):
  config, _ = synthetic
  config = _test_config(config.data.data_dir, eval_file=str(tmp_path / "none.tfrecords"))
  with pytest.raises(FileNotFoundError, match="none.tfrecords"):
    pipeline.Split(config, "test")


def _small_records(count, height=24, width=32):
  return [_rendered(seed, 3, 4, height, width) for seed in range(count)]


def test_truncated_file_names_the_file_and_record(tmp_path):
  records = _small_records(6)
  path = tmp_path / "whole.tfrecords"
  official.write_records(str(path), records)
  cut = tmp_path / "cut.tfrecords"
  data = path.read_bytes()
  cut.write_bytes(data[:len(data) // 2])
  read = []
  with pytest.raises(official.RecordError) as error:
    for index, example in official.read_records(str(cut), height=24, width=32):
      read.append((index, example))
  assert 0 < len(read) < len(records)
  for position, (index, example) in enumerate(read):  # a clean prefix first
    assert index == position
    np.testing.assert_array_equal(example["mask"], records[index]["mask"])
  message = str(error.value)
  assert str(cut) in message and f"record {len(read)} " in message


def test_record_with_wrong_shapes_is_named(tmp_path):
  records = _small_records(2)
  records[1]["image"] = np.zeros((10, 10, 3), np.uint8)
  path = tmp_path / "shapes.tfrecords"
  official.write_records(str(path), records)
  reader = official.read_records(str(path), height=24, width=32)
  index, _ = next(reader)
  assert index == 0
  with pytest.raises(official.RecordError) as error:
    next(reader)
  assert str(path) in str(error.value) and "record 1 " in str(error.value)


def test_overlapping_masks_fail_the_build_naming_the_record(tmp_path):
  records = [_rendered(seed, 3, 4) for seed in range(2)]
  records[1]["mask"][2] |= records[1]["mask"][1]  # object 1's pixels also in 2
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  path = manual_dir / official.OFFICIAL_FILENAME
  official.write_records(str(path), records)
  with pytest.raises(official.RecordError) as error:
    _build_real(tmp_path / "data", manual_dir, "overlap", train_records=(0, 1),
                test_records=(1, 2))
  message = str(error.value)
  assert str(path) in message and "record 1:" in message
  assert "several masks" in message


def test_masks_leaving_pixels_uncovered_are_rejected():
  example = _rendered(0, 3, 4, 24, 32)
  example["mask"][0] = 0  # the background mask gone
  with pytest.raises(official.RecordError, match=r"f\.tfrecords: record 7: .*no mask"):
    official.to_compact(example, path="f.tfrecords", index=7)


@pytest.mark.parametrize("overrides, names", [
    ({"dataset": "clevr"}, pipeline.DATASETS),
    ({"dataset": "clevr_with_masks", "real_config": "clevr10",
      "image_height": 240, "image_width": 320}, ("poster", "full", "clevr6")),
    ({"dataset": "clevr_with_masks", "real_config": "poster"}, ("240x320",)),
])
def test_make_builder_rejects_bad_choices_naming_them(tmp_path, overrides, names):
  config = _test_config(tmp_path, **overrides)  # 48x64 images unless overridden
  with pytest.raises(ValueError) as error:
    pipeline.make_builder(config)
  for name in names:
    assert name in str(error.value)


def test_unknown_real_source_is_rejected():
  with pytest.raises(ValueError, match="'manual' or 'gcs'"):
    clevr_with_masks.ClevrWithMasks(source="s3")


def test_split_of_unprepared_dataset_says_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="--mode=prepare"):
    pipeline.Split(_test_config(tmp_path), "train")


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_a_data_dir_that_cannot_be_written_is_named_before_the_build(tmp_path, where):
  config = defaults.get_config("test")
  if where == "under_a_file":
    (tmp_path / "file").write_text("")
    config.data.data_dir = str(tmp_path / "file" / "data")
  else:
    (tmp_path / "data").mkdir(mode=0o555)
    if os.access(tmp_path / "data", os.W_OK):  # root: permissions do not stop it
      pytest.skip("this user writes in a read-only folder")
    config.data.data_dir = str(tmp_path / "data")
  with pytest.raises(ValueError, match="cannot write in --config.data.data_dir="):
    pipeline.prepare(config)


def test_per_device_batch():
  assert pipeline.per_device_batch(8, 2, 2) == 2
  with pytest.raises(ValueError, match="--config.batch_size"):
    pipeline.per_device_batch(10, 1, 4)


# ---------------------------------------------------------------- pipeline


def test_batches_shapes_dtypes_and_targets(synthetic, stored):
  config, _ = synthetic
  h, w = config.data.image_height, config.data.image_width
  split = pipeline.Split(config, "train")
  assert split.num_examples == config.data.synthetic.num_train
  batches = list(split.train_batches(0))
  assert len(batches) == split.steps_per_epoch(config.batch_size) == 4
  b, s = config.batch_size, schema.MAX_SLOTS
  # Bytes, not floats: 4 bytes a pixel (RGB + label) and a few per example.
  expected = {"image": ((b, h, w, 3), np.uint8), "labels": ((b, h, w), np.uint8),
              "shape": ((b, s), np.uint8), "visibility": ((b, s), np.uint8),
              "valid": ((b,), np.bool_), "index": ((b,), np.int32)}
  seen_gray = seen_colour = 0
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    flat = _derived(batch, config)
    assert flat["valid"].all()
    for i, index in enumerate(flat["index"]):
      source = stored["train"][int(index)]
      rgb, labels = source["image"], source["labels"][..., 0]
      np.testing.assert_array_equal(batch["image"][i], rgb)
      image = flat["image"][i]
      assert 0 <= image.min() and image.max() <= 1
      np.testing.assert_allclose(image, rgb / 255, atol=1e-7)
      spread = rgb.max(-1).astype(int) - rgb.min(-1).astype(int)
      np.testing.assert_array_equal(flat["gray_mask"][i], spread <= 10)
      seen_gray += int((spread <= 10).sum())
      seen_colour += int((spread > 10).sum())
      np.testing.assert_array_equal(flat["instance_labels"][i], labels)
      num_masks = flat["num_masks"][i]
      assert num_masks == _objects(source) + 1 == len(np.unique(labels))
      assert 0 <= labels.min() and labels.max() == num_masks - 1
      semantic = flat["semantic"][i]
      np.testing.assert_array_equal(semantic, source["shape"][labels])
      assert (semantic[labels == 0] == 0).all()
      assert set(np.unique(semantic[labels > 0])) <= {1, 2, 3}
  assert seen_gray and seen_colour  # the gray rule was tested both ways


@pytest.mark.parametrize("grayscale", [False, True])
def test_device_derivation_equals_a_tf_data_preprocessing(synthetic, grayscale):
  config = _test_config(synthetic[0].data.data_dir, grayscale=grayscale)
  split = pipeline.Split(config, "test")
  for batch in split.eval_batches():  # with padding examples
    ours, reference = _derived(batch, config), _tf_preprocess(batch, grayscale)
    assert ours.keys() == reference.keys()
    for name, expected in reference.items():
      assert ours[name].dtype == expected.dtype, name
      if name == "image" and grayscale:
        # A dot product of three float32 terms in TF, a sum of three products
        # in XLA: rounded in another order, within a few ulps of 1 (1.2e-7).
        np.testing.assert_allclose(ours[name], expected, rtol=0, atol=5e-7)
      elif name == "image":
        # XLA may compute x / 255 as x * (1 / 255): at most one float32 ulp
        # (relative 2**-23) from TF's division.
        np.testing.assert_allclose(ours[name], expected, rtol=2**-23, atol=0)
      else:  # integer maps and counts: bit for bit
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


def test_fields_select_what_is_sent(synthetic):
  config, _ = synthetic
  split = pipeline.Split(config, "train")
  (first,) = itertools.islice(split.train_batches(0, fields=("image",)), 1)
  whole = next(split.train_batches(0))
  assert list(first) == ["image"]
  np.testing.assert_array_equal(first["image"], whole["image"])
  with pytest.raises(ValueError, match="unknown batch field"):
    split.train_batches(0, fields=("image", "semantic"))


def test_grayscale_config_sends_the_same_rgb_bytes(synthetic):
  config, _ = synthetic
  rgb = next(pipeline.Split(config, "train").train_batches(0))
  gray_config = _test_config(config.data.data_dir, grayscale=True)
  gray = next(pipeline.Split(gray_config, "train").train_batches(0))
  _assert_batches_equal([gray], [rgb])  # the devices make the luminance
  derived = _derived(gray, gray_config)
  r, g, b = (rgb["image"][..., c].astype(np.float32) / 255 for c in range(3))
  np.testing.assert_allclose(derived["image"][..., 0], 0.299 * r + 0.587 * g + 0.114 * b,
                             atol=1e-6)


def test_eval_pads_to_whole_batches_and_keeps_every_example_once(synthetic, stored):
  config, _ = synthetic
  split = pipeline.Split(config, "test")
  assert (split.num_examples, config.eval.batch_size) == (12, 8)
  assert split.num_eval_batches() == 2
  batches = list(split.eval_batches())
  assert len(batches) == 2
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert valid.sum() == 12 and (~valid).sum() == 4
  assert sorted(index[valid].tolist()) == list(range(12))
  padding = np.concatenate([b["visibility"] for b in batches])[~valid]
  np.testing.assert_array_equal(padding, 0)  # no masks to score
  for batch in batches:
    for i in np.flatnonzero(batch["valid"]):
      np.testing.assert_array_equal(
          batch["labels"][i], stored["test"][int(batch["index"][i])]["labels"][..., 0])


def test_eval_max_examples_then_whole_split(synthetic):
  config, _ = synthetic
  split = pipeline.Split(config, "test")
  whole_order = np.concatenate([b["index"] for b in split.eval_batches()])
  split = pipeline.Split(config, "test")  # a fresh cache, first read partially
  assert split.num_eval_batches(max_examples=5) == 1
  (first,) = list(split.eval_batches(max_examples=5))
  assert first["valid"].sum() == 5
  np.testing.assert_array_equal(first["index"][:5], whole_order[:5])
  again = np.concatenate([b["index"] for b in split.eval_batches()])
  np.testing.assert_array_equal(again, whole_order)


def test_same_seed_same_batches_other_epoch_or_seed_other_order(synthetic):
  config, _ = synthetic
  epoch0 = list(pipeline.Split(config, "train").train_batches(0))
  _assert_batches_equal(list(pipeline.Split(config, "train").train_batches(0)), epoch0)
  order = np.concatenate([b["index"] for b in epoch0])
  assert sorted(order.tolist()) == list(range(config.data.synthetic.num_train))
  epoch1 = list(pipeline.Split(config, "train").train_batches(1))
  assert not np.array_equal(np.concatenate([b["index"] for b in epoch1]), order)
  reseeded = _test_config(config.data.data_dir)
  reseeded.seed = config.seed + 1
  other = list(pipeline.Split(reseeded, "train").train_batches(0))
  assert not np.array_equal(np.concatenate([b["index"] for b in other]), order)


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_flat_slices_of_the_global_batches(synthetic, process_count):
  config, _ = synthetic
  split = pipeline.Split(config, "train")
  single = list(split.train_batches(3))
  shards = [list(split.train_batches(3, process_index=p, process_count=process_count))
            for p in range(process_count)]
  per_process = config.batch_size // process_count
  for shard in shards:
    assert all(b["image"].shape[0] == per_process for b in shard)
  for step in zip(*shards):
    own = [set(b["index"].tolist()) for b in step]
    assert sum(map(len, own)) == len(set().union(*own)) == config.batch_size
  _assert_batches_equal(_concat_processes(shards), single)

  eval_single = list(split.eval_batches())
  eval_shards = [list(split.eval_batches(process_index=p, process_count=process_count))
                 for p in range(process_count)]
  assert all(len(s) == split.num_eval_batches() for s in eval_shards)
  _assert_batches_equal(_concat_processes(eval_shards), eval_single)
  with pytest.raises(ValueError, match="does not divide over 3 processes"):
    next(split.train_batches(3, process_count=3))


def _lanes(config):
  """The training split read each way: in memory (config.data.cache), streamed."""
  return {"in memory": pipeline.Split(config, "train"),
          "streamed": pipeline.Split(_test_config(config.data.data_dir, cache=False), "train")}


def test_each_lane_visits_every_example_once_an_epoch_in_whole_batches(synthetic, stored):
  config, _ = synthetic
  for lane, split in _lanes(config).items():
    batches = list(split.train_batches(2))
    assert len(batches) == split.steps_per_epoch(config.batch_size), lane
    index = np.concatenate([b["index"] for b in batches])
    assert len(set(index.tolist())) == len(index) == len(batches) * config.batch_size, lane
    assert set(index.tolist()) <= set(stored["train"]), lane
    for batch in batches:  # each example's fields travel together
      for image, example_index in zip(batch["image"], batch["index"]):
        np.testing.assert_array_equal(image, stored["train"][int(example_index)]["image"])
    again = list(_lanes(config)[lane].train_batches(2))  # a restarted process
    _assert_batches_equal(again, batches)


def test_in_memory_epochs_are_gathered_at_the_epoch_order(synthetic):
  # The host-gathered and the device-resident runs share one order: the
  # positions a device-resident split is sent pick, from the split's arrays,
  # the batches the host gathers; for every process's slice and a resumed epoch.
  config, _ = synthetic
  split = pipeline.Split(config, "train")
  arrays = split.train_arrays()
  order = split.epoch_order(1)
  assert sorted(order.tolist()) == sorted(set(order.tolist()))  # no repeats
  assert not np.array_equal(order, split.epoch_order(0))
  cases = [dict(epoch=1), dict(epoch=1, skip_batches=2),
           *[dict(epoch=1, process_index=p, process_count=2) for p in range(2)]]
  for case in cases:
    gathered = list(split.train_batches(**case))
    positions = list(split.train_batches(**case, positions_only=True))
    assert gathered and len(positions) == len(gathered)
    _assert_batches_equal([{k: v[p["position"]] for k, v in arrays.items()} for p in positions],
                          gathered)
  np.testing.assert_array_equal(
      np.concatenate([p["position"] for p in split.train_batches(1, positions_only=True)]),
      order)
  (first,) = itertools.islice(split.train_batches(1, fields=("image", "index")), 1)
  assert set(first) == {"image", "index"}
  assert {k: v.dtype for k, v in first.items()} == {"image": np.uint8, "index": np.int32}


def test_device_resident_split_gathers_the_host_batches_on_the_devices(synthetic):
  config, _ = synthetic
  split = pipeline.Split(_test_config(config.data.data_dir, device_resident=True,
                                      cache=False), "train")
  assert split.in_memory  # device-resident implies the in-memory lane
  mesh = sharding.make_mesh()
  data = batch_lib.DeviceData(split.train_arrays(), mesh)
  assert data.num_examples == split.num_examples
  gather = batch_lib.make_gather(mesh)
  for epoch, skip in ((0, 0), (1, 2)):
    host = list(split.train_batches(epoch, skip_batches=skip))
    positions = list(split.train_batches(epoch, skip_batches=skip, positions_only=True))
    assert len(positions) == len(host) == split.steps_per_epoch(config.batch_size) - skip
    on_devices = [{k: np.asarray(v) for k, v in gather(
        data.arrays, sharding.to_global(p, mesh)).items()} for p in positions]
    _assert_batches_equal(on_devices, host)


@pytest.mark.parametrize("lane", ["in memory", "streamed"])
def test_resume_mid_epoch_gives_the_rest_of_the_epoch(synthetic, lane):
  config, _ = synthetic
  split = _lanes(config)[lane]
  full = list(split.train_batches(1))
  assert len(full) == 4
  _assert_batches_equal(list(split.train_batches(1, skip_batches=3)), full[3:])
  resumed = _lanes(config)[lane]  # a restarted process
  _assert_batches_equal(list(resumed.train_batches(1, skip_batches=1)), full[1:])


class _Masks:
  """A pseudo-mask store whose labels are the example's index, everywhere."""

  def __init__(self, shape):
    self.shape = shape

  def lookup(self, index):
    return np.broadcast_to(np.asarray(index, np.uint8)[..., None, None],
                           np.shape(index) + self.shape).copy()


def test_pseudo_masks_attach_to_every_lanes_batches(synthetic):
  config, _ = synthetic
  shape = (config.data.image_height, config.data.image_width)
  for lane, split in _lanes(config).items():
    split.attach_pseudo_masks(_Masks(shape))
    for batch in itertools.islice(split.train_batches(0, fields=("image",)), 2):
      assert "index" in batch, lane  # looked up by it, so always sent
      np.testing.assert_array_equal(batch[pipeline.PSEUDO_LABELS][:, 3, 5],
                                    batch["index"].astype(np.uint8), err_msg=lane)
  split = pipeline.Split(config, "train")
  split.attach_pseudo_masks(_Masks(shape))
  arrays = split.train_arrays(("image",))  # what a device-resident split holds
  np.testing.assert_array_equal(arrays[pipeline.PSEUDO_LABELS][:, 0, 0],
                                arrays["index"].astype(np.uint8))


def test_eval_file_is_read_whole_as_the_test_split(synthetic, tmp_path):
  config, _ = synthetic
  h, w = config.data.image_height, config.data.image_width
  records = [_rendered(seed, 3, 6, h, w) for seed in range(100, 105)]
  path = tmp_path / "mine.tfrecords"
  official.write_records(str(path), records)
  split = pipeline.Split(_test_config(config.data.data_dir, eval_file=str(path)),
                         "test")
  assert split.num_examples == len(records)
  (batch,) = list(split.eval_batches())
  assert batch["valid"].tolist() == [True] * 5 + [False] * 3
  np.testing.assert_array_equal(batch["index"][:5], np.arange(5))
  derived = _derived(batch, config)
  for i, record in enumerate(records):
    np.testing.assert_array_equal(batch["image"][i], record["image"])
    np.testing.assert_array_equal(batch["labels"][i], schema.masks_to_labels(record["mask"]))
    assert derived["num_masks"][i] == _objects(record) + 1


# ------------------------------------------------ messages that point the right way


def test_uncompressed_tfrecord_is_named_as_not_gzip(tmp_path):
  path = tmp_path / "plain.tfrecords"
  with tf.io.TFRecordWriter(str(path)) as writer:  # no GZIP
    for record in _small_records(1):
      writer.write(official.serialize_record(record))
  with pytest.raises(official.RecordError, match="not GZIP-compressed") as error:
    list(official.read_records(str(path), height=24, width=32))
  assert "download it again" not in str(error.value)


def test_records_of_another_image_size_name_theirs_and_the_settings(tmp_path):
  path = tmp_path / "small.tfrecords"
  official.write_records(str(path), _small_records(1))  # 24x32 images
  with pytest.raises(official.RecordError) as error:
    list(official.read_records(str(path), height=48, width=64))
  message = str(error.value)
  assert "Its images are 24x32, not 48x64" in message
  assert "--config.data.image_height" in message and "--config.data.image_width" in message


def test_eval_file_that_is_missing_or_a_directory_is_named_without_download_advice(
    synthetic, tmp_path):
  config, _ = synthetic
  missing = _test_config(config.data.data_dir, eval_file=str(tmp_path / "none.tfrecords"))
  with pytest.raises(FileNotFoundError, match="eval_file=.*none.tfrecords does not exist") as e:
    pipeline.Split(missing, "test")
  assert "10.5 GB" not in str(e.value)
  directory = _test_config(config.data.data_dir, eval_file=str(tmp_path))
  with pytest.raises(ValueError, match="is a directory"):
    pipeline.Split(directory, "test")


def test_eval_batch_that_does_not_divide_names_the_eval_flag(synthetic):
  config, _ = synthetic
  config = _test_config(config.data.data_dir)
  config.eval.batch_size = 6
  split = pipeline.Split(config, "test")
  with pytest.raises(ValueError, match=r"set --config.eval.batch_size to a multiple"):
    next(split.eval_batches(process_count=4))


def _incomplete_folders(root):
  return [os.path.join(d, n) for d, names, _ in os.walk(root) for n in names
          if n.startswith("incomplete.")]


def test_interrupted_prepare_leaves_no_incomplete_folder(tmp_path, monkeypatch):
  config = _test_config(tmp_path, image_height=24, image_width=32)
  config.data.synthetic.num_train, config.data.synthetic.num_test = 2, 1

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(renderer, "render_scenes", interrupted)
  with pytest.raises(KeyboardInterrupt):
    pipeline.prepare(config)
  assert _incomplete_folders(tmp_path) == []
  monkeypatch.undo()
  # One left by a build that was killed (no cleanup could run) goes with the next build.
  builder = pipeline.make_builder(config)
  leftover = os.path.join(os.path.dirname(str(builder.data_dir)), "incomplete.KILLED_1.0.0")
  os.makedirs(leftover)
  assert pipeline.prepare(config).is_prepared()
  assert _incomplete_folders(tmp_path) == []
