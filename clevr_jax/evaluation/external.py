"""Any method's features and masks under the protocol (--mode=score_features,
--mode=score_masks).

Features: per-pixel features of the test images from any model, one
`<index>.npy` per image ([h, w, c], float16/32/64; `index` is the image's
0-based position in the test split, leading zeros allowed) or `.npz` shards
(`features` [n, h, w, c] with the matching `index` [n]), in one folder (one
feature set, named by the folder) or in one folder per feature set. Each set
is scored like a tap: through every configured segmenter. A set named
`pixels` is scored with the pixel transforms, as the raw image is.

Masks: predicted label maps, one `<index>.npy` (integer [h, w]) or
`<index>.png` (8- or 16-bit labels) per image, resized to the image by
nearest neighbour, scored with every instance metric; no clustering.

Everything is checked before any work from the files' headers (indices,
shapes, dtypes); the values (NaN or inf in features, negative labels) are
checked batch by batch as they are read, on every process alike, so a run
stops with one error naming the file before anything is written. Files are
read one image (or one shard row) at a time: memory holds a batch, never a set.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clevr_jax import logs
from clevr_jax import metrics
from clevr_jax import plots
from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.evaluation import protocol
from clevr_jax.evaluation import results as results_lib
from clevr_jax.segmentation import segmenters as segmenters_lib

FEATURE_SUFFIXES = (".npy", ".npz")
MASK_SUFFIXES = (".npy", ".png")
_INDEX = re.compile(r"^[0-9]+$")
# Pillow modes of single-channel label PNGs: 8-bit gray or palette indices, 16-bit.
_LABEL_PNG_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclasses.dataclass(frozen=True)
class _Item:
  """Where one image's array lives: a .npy/.png file, or a row of an .npz shard."""
  path: str
  row: int | None = None

  def __str__(self) -> str:
    return self.path if self.row is None else f"{self.path} (row {self.row})"


@dataclasses.dataclass
class ArraySet:
  """One set of per-image arrays (a feature set, or a set of masks).

  `items[i]` is image i's file; `shape` (h, w[, c]) and `dtype` those of every
  item, read from the headers.
  """
  name: str
  folder: str
  items: dict[int, _Item]
  shape: tuple[int, ...]
  dtype: np.dtype

  def read(self, position: int) -> np.ndarray:
    """Image `position`'s array, read alone."""
    item = self.items[position]
    try:
      if item.path.endswith(".png"):
        return _read_png(item.path)
      if item.row is None:
        return np.array(np.load(item.path, mmap_mode="r", allow_pickle=False))
      return _read_shard_row(item.path, item.row)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise ValueError(f"{item}: cannot be read ({type(e).__name__}: {e}): write it again "
                       "with np.save / np.savez") from e


def _index_of(path: str, flag: str) -> int:
  stem = os.path.splitext(os.path.basename(path))[0]
  if not _INDEX.match(stem):
    raise ValueError(f"{path}: {flag} files are named <index> (the image's 0-based position "
                     "in the test split, e.g. 0.npy or 00012.npy): rename it")
  return int(stem)


def _npy_header(fileobj: Any, path: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
  """(shape, dtype, fortran order, header length) of an .npy stream."""
  try:
    version = np.lib.format.read_magic(fileobj)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(fileobj)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{path}: not a NumPy array file ({e}): write it with np.save") from e
  return tuple(shape), np.dtype(dtype), fortran, fileobj.tell()


def _check_dtype(path: str, dtype: np.dtype, kind: str) -> None:
  if kind == "features" and not np.issubdtype(dtype, np.floating):
    raise ValueError(f"{path}: {dtype} features; features are float16 or float32 "
                     "(save x.astype(np.float32))")
  if kind == "masks" and not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
    raise ValueError(f"{path}: {dtype} masks; masks are integer labels, one per pixel "
                     "(save labels.astype(np.int32))")


def _npy_items(path: str, kind: str) -> tuple[dict[int, _Item], tuple[int, ...], np.dtype, str]:
  with open(path, "rb") as f:
    shape, dtype, fortran, _ = _npy_header(f, path)
  _check_dtype(path, dtype, kind)
  del fortran  # np.load reads either order
  return {_index_of(path, f"--{kind}"): _Item(path)}, shape, dtype, path


def _npz_items(path: str, kind: str) -> tuple[dict[int, _Item], tuple[int, ...], np.dtype, str]:
  """A shard's rows, from its `features` header and its `index` array."""
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if "features.npy" not in names or "index.npy" not in names:
        raise ValueError(f"{path}: an .npz shard holds `features` [n, h, w, c] and `index` "
                         f"[n] (it holds {sorted(n[:-4] for n in names)}): write it with "
                         "np.savez(path, features=..., index=...)")
      with archive.open("features.npy") as f:
        shape, dtype, fortran, _ = _npy_header(f, path)
      with archive.open("index.npy") as f:
        index = np.lib.format.read_array(f, allow_pickle=False)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e}): write it "
                     "again with np.savez(path, features=..., index=...)") from e
  _check_dtype(path, dtype, kind)
  if fortran:
    raise ValueError(f"{path}: `features` is in Fortran order: save np.ascontiguousarray(x)")
  if len(shape) != 4 or index.shape != (shape[0],) or not np.issubdtype(index.dtype,
                                                                        np.integer):
    raise ValueError(f"{path}: `features` {list(shape)} and `index` {list(index.shape)} "
                     f"({index.dtype}): a shard holds features [n, h, w, c] and the n integer "
                     "image indices")
  if len(np.unique(index)) != len(index):
    raise ValueError(f"{path}: `index` lists an image twice")
  return ({int(i): _Item(path, row) for row, i in enumerate(index)}, shape[1:], dtype, path)


def _png_items(path: str, kind: str) -> tuple[dict[int, _Item], tuple[int, ...], np.dtype, str]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      mode, (width, height) = image.mode, image.size
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"{path}: not a readable PNG ({type(e).__name__}: {e})") from e
  if mode not in _LABEL_PNG_MODES:
    raise ValueError(f"{path}: a {mode} PNG; label maps are single-channel 8- or 16-bit "
                     "PNGs (Image.fromarray(labels.astype(np.uint8 or np.uint16)))")
  dtype = np.dtype(np.uint8 if mode in ("L", "P") else np.int32)
  return {_index_of(path, f"--{kind}"): _Item(path)}, (height, width), dtype, path


def _read_png(path: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    return np.asarray(image).astype(np.int32)


def _read_shard_row(path: str, row: int) -> np.ndarray:
  """One row of an .npz shard's `features`, without reading the others."""
  with zipfile.ZipFile(path) as archive, archive.open("features.npy") as f:
    shape, dtype, _, start = _npy_header(f, path)
    size = int(np.prod(shape[1:])) * dtype.itemsize
    f.seek(start + row * size)
    data = f.read(size)
  if len(data) != size:
    raise ValueError(f"row {row} is cut short")
  return np.frombuffer(data, dtype).reshape(shape[1:])


def _set_from_files(name: str, folder: str, files: Sequence[str], kind: str) -> ArraySet:
  """One set from its files' headers: one array per index, one shape for all."""
  items: dict[int, _Item] = {}
  first: tuple[tuple[int, ...], np.dtype, str] | None = None
  ndim = 3 if kind == "features" else 2
  for path in files:
    suffix = os.path.splitext(path)[1].lower()
    read = {".npy": _npy_items, ".npz": _npz_items, ".png": _png_items}[suffix]
    found, shape, dtype, where = read(path, kind)
    if len(shape) != ndim:
      layout = "[h, w, c]" if kind == "features" else "[h, w]"
      raise ValueError(f"{where}: shape {list(shape)}; {kind} are {layout} per image")
    if first is None:
      first = (shape, dtype, where)
    elif kind == "features" and shape != first[0]:
      raise ValueError(f"{where}: shape {list(shape)}, but {first[2]} has {list(first[0])}: "
                       f"the features of one set share one shape (write {name!r}'s "
                       "files at one resolution and channel count)")
    for index, item in found.items():
      if index in items:
        raise ValueError(f"{item}: image {index} is already in {items[index]}: keep one")
      items[index] = item
  assert first is not None
  return ArraySet(name, folder, items, first[0], first[1])


def _listing(folder: str, suffixes: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the files with `suffixes`, the subfolders) of a folder, sorted."""
  names = sorted(os.listdir(folder))
  files = [os.path.join(folder, n) for n in names
           if os.path.splitext(n)[1].lower() in suffixes
           and os.path.isfile(os.path.join(folder, n))]
  folders = [os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))]
  return files, folders


def read_sets(path: str, kind: str, num_images: int, split_size: int) -> list[ArraySet]:
  """The sets under `path` (`kind`: 'features' or 'masks'), checked against the
  split: one folder of files is one set named by the folder; a folder of
  folders holds one set per folder. Raises FileNotFoundError / ValueError that
  name the file and what to do."""
  flag = f"--{kind}"
  suffixes = FEATURE_SUFFIXES if kind == "features" else MASK_SUFFIXES
  if not os.path.exists(path):
    raise FileNotFoundError(f"{flag}: no file or folder at {path!r}")
  path = os.path.normpath(path)
  if os.path.isfile(path):
    if os.path.splitext(path)[1].lower() != ".npz" or kind != "features":
      raise ValueError(f"{flag}={path}: give the folder that holds the per-image files")
    sets = [_set_from_files(os.path.splitext(os.path.basename(path))[0], path, [path], kind)]
  else:
    files, folders = _listing(path, suffixes)
    if files:
      sets = [_set_from_files(os.path.basename(path), path, files, kind)]
    else:
      sets = []
      for folder in folders:
        inner, _ = _listing(folder, suffixes)
        if not inner:
          raise ValueError(f"{folder}: no {' or '.join(suffixes)} files (an empty "
                           f"folder): put one file per test image in it, or remove it")
        sets.append(_set_from_files(os.path.basename(folder), folder, inner, kind))
      if not sets:
        raise ValueError(f"{path}: no {' or '.join(suffixes)} files and no folders of them "
                         f"(an empty folder): give the folder of {kind} per test image")
  for array_set in sets:
    _check_coverage(array_set, num_images, split_size, flag)
  return sets


def _check_coverage(array_set: ArraySet, num_images: int, split_size: int, flag: str) -> None:
  past = sorted(i for i in array_set.items if i >= split_size)
  if past:
    raise ValueError(f"{array_set.items[past[0]]}: image {past[0]}, but the test split has "
                     f"{split_size} images (0..{split_size - 1}): {len(past)} file(s) of "
                     f"{array_set.folder} are for more images than the split; score them "
                     "against the split they came from (--config.data.eval_file)")
  missing = [i for i in range(num_images) if i not in array_set.items]
  if missing:
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    raise ValueError(f"{array_set.folder}: no {flag[2:]} for {len(missing)} of the "
                     f"{num_images} test images (image(s) {shown}): write one file per "
                     "image, or score fewer with --config.eval.max_images=N")


class _Reader:
  """This process's rows of each global batch, read from the sets in order.

  The evaluation batches visit the split in order, padded at the end: batch b's
  row r is image b * batch + r; this process holds its contiguous slice.
  """

  def __init__(self, config: ml_collections.ConfigDict, sets: Sequence[ArraySet],
               num_images: int) -> None:
    self.sets, self.num_images = list(sets), num_images
    global_batch = config.eval.batch_size
    per_process = global_batch // jax.process_count()
    self._rows = jax.process_index() * per_process + np.arange(per_process)
    self._global_batch, self._batches = global_batch, 0

  def next_positions(self) -> np.ndarray:
    positions = self._batches * self._global_batch + self._rows
    self._batches += 1
    return positions

  def read(self, array_set: ArraySet, positions: np.ndarray, shape: tuple[int, ...],
           dtype: np.dtype) -> np.ndarray:
    out = np.zeros((len(positions),) + shape, dtype)
    for row, position in enumerate(positions):
      if position < self.num_images:
        out[row] = array_set.read(int(position))
    return out


def _agree_on_bad_rows(bad: np.ndarray, positions: np.ndarray) -> int | None:
  """The first image any process found bad in this batch (every process alike)."""
  flags = sharding.gather_rows(np.where(bad, positions, -1).astype(np.int64))
  found = flags[flags >= 0]
  return int(found.min()) if found.size else None


def _resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """[B, h, w, ...] -> [B, height, width, ...] on the devices, by the same index
  map as `metrics.resize_nearest` on the host (pixel centres)."""
  rows = metrics.nearest_index(x.shape[1], height).astype(np.int32)
  cols = metrics.nearest_index(x.shape[2], width).astype(np.int32)
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


def check_feature_sets(config: ml_collections.ConfigDict, sets: Sequence[ArraySet]) -> None:
  """A 'pixels' set is the image: as many channels as the configured image."""
  channels = 1 if config.data.grayscale else 3
  for array_set in sets:
    if array_set.name in segmenters_lib.PIXEL_TAPS and array_set.shape[-1] != channels:
      raise ValueError(f"{array_set.folder}: a feature set named {array_set.name!r} is the "
                       f"image, {channels} channel(s) in [0, 1], but its files have "
                       f"{array_set.shape[-1]}: rename the folder to score them as features")


class _FeatureSource:
  """`protocol.FeaturesFn` over feature sets: each batch's rows read from the
  files by this process, checked for NaN and inf, and put on the devices."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               sets: Sequence[ArraySet], num_images: int) -> None:
    self.mesh, self.sets = mesh, list(sets)
    self.height, self.width = config.data.image_height, config.data.image_width
    self.reader = _Reader(config, sets, num_images)
    self._resize = jax.jit(_resize_nearest, static_argnums=(1, 2))

  def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    del batch  # the rows follow from the batch's place in the loop
    positions = self.reader.next_positions()
    features = {}
    for array_set in self.sets:
      dtype = np.float16 if array_set.dtype == np.float16 else np.float32
      local = self.reader.read(array_set, positions, array_set.shape, dtype)
      bad = ~np.isfinite(local).reshape(len(local), -1).all(axis=1)
      first_bad = _agree_on_bad_rows(bad, positions)
      if first_bad is not None:
        raise ValueError(f"{array_set.items[first_bad]}: NaN or inf in the features: "
                         "replace them (e.g. np.nan_to_num) and score again")
      x = sharding.to_global({"x": local}, self.mesh)["x"]
      h, w = array_set.shape[:2]
      if self.height % h or self.width % w:  # not a tap's grid: to the image's size
        x = self._resize(x, self.height, self.width)
      features[array_set.name] = x
    return features


def _output_results(config: ml_collections.ConfigDict, name: str, count: int,
                    sets: Sequence[ArraySet]) -> dict[str, Any]:
  return {"name": name, "config": config.to_dict(), "num_images": count,
          "sources": {s.name: s.folder for s in sets}}


def score_features(config: ml_collections.ConfigDict, path: str, output_dir: str,
                   split: Any = None) -> dict[str, Any]:
  """Scores the feature sets under `path` through every configured segmenter;
  writes results.{json,md} and the figures to `output_dir` (process 0).
  `split`: the truth (default: the configured test split, `pipeline.Split`), any
  object with its `num_examples` and `eval_batches`."""
  segmenters = segmenters_lib.configured(config)
  if split is None:
    from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    split = pipeline.Split(config, "test")
  count = protocol.num_images(config, split)
  sets = read_sets(path, "features", count, split.num_examples)
  check_feature_sets(config, sets)
  mesh = sharding.make_mesh()
  names = tuple(s.name for s in sets)
  table, first = protocol.score_features(
      config, mesh, _FeatureSource(config, mesh, sets, count), names, split, segmenters,
      keep_first=config.eval.num_figure_images, what="features")
  results = _output_results(config, "score_features", count, sets)
  results["segmenters"] = table
  results["segmenter_specs"] = {s.name: results_lib.spec_dict(s) for s in segmenters}
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    plots.save_tap_figures(output_dir, table, first, names)
    results_lib.write_results(output_dir, results)
  return results


def dense_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
  """Label maps [B, H, W] with each image's labels renumbered 0..n-1 in their
  order (0 stays 0 where present): (maps, the largest n)."""
  out = np.zeros(labels.shape, np.int32)
  largest = 1
  for b, image in enumerate(labels):
    values, inverse = np.unique(image, return_inverse=True)
    out[b] = inverse.reshape(image.shape)
    largest = max(largest, len(values))
  return out, largest


def score_masks(config: ml_collections.ConfigDict, path: str, output_dir: str
                ) -> dict[str, Any]:
  """Scores the predicted label maps under `path` with every instance metric;
  writes results.{json,md} and the figures to `output_dir` (process 0)."""
  from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  split = pipeline.Split(config, "test")
  count = protocol.num_images(config, split)
  sets = read_sets(path, "masks", count, split.num_examples)
  mesh = sharding.make_mesh()
  height, width = config.data.image_height, config.data.image_width
  reader = _Reader(config, sets, count)
  accumulators = {s.name: metrics.MeanAccumulator() for s in sets}
  k_accumulators = {s.name: metrics.MeanAccumulator() for s in sets}
  first: dict[str, Any] = {}
  keep = config.eval.num_figure_images
  progress = logs.Progress("masks", count, config.eval.progress_every_s)
  for batch in protocol.host_batches(config, split, mesh):
    positions = reader.next_positions()
    truth = sharding.local_rows(batch["instance_labels"])
    num_masks, valid = sharding.to_host(batch["num_masks"]), sharding.to_host(batch["valid"])
    labels_of, scores_of = {}, {}
    for array_set in sets:
      local = np.stack([
          metrics.resize_nearest(array_set.read(int(p))[None], height, width)[0]
          if p < count else np.zeros((height, width), np.int64) for p in positions])
      bad = (local < 0).reshape(len(local), -1).any(axis=1)
      first_bad = _agree_on_bad_rows(bad, positions)
      if first_bad is not None:
        raise ValueError(f"{array_set.items[first_bad]}: negative labels; labels are 0 or "
                         "more (one per region)")
      local, largest = dense_labels(local)
      slots = int(sharding.gather_rows(np.array([largest])).max())
      tables = sharding.gather_rows(
          metrics.contingency_host(truth, local, schema.MAX_SLOTS, slots))
      scores = metrics.score_tables(tables, num_masks, valid)
      accumulators[array_set.name].add(scores)
      k_accumulators[array_set.name].add(metrics.k_error(tables, num_masks, valid))
      labels_of[array_set.name], scores_of[array_set.name] = local, scores
    if keep and not first:
      first = {"image": sharding.local_rows(batch["image"])[:keep],
               "instance_labels": truth[:keep],
               "num_masks": sharding.local_rows(batch["num_masks"])[:keep],
               "labels": {"masks": {n: v[:keep] for n, v in labels_of.items()}},
               "scores": {"masks": scores_of}}
    progress.update(int(valid.sum()))
  names = tuple(s.name for s in sets)
  table = {n: accumulators[n].result() | k_accumulators[n].result() for n in names}
  results = _output_results(config, "score_masks", count, sets)
  results["masks"] = table
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    plots.save_tap_figures(output_dir, {"masks": table}, first, names)
    results_lib.write_results(output_dir, results)
  return results
