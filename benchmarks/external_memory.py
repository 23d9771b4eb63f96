r"""Peak host memory of --mode=score_features on a large feature set.

  python -m benchmarks.external_memory [--num_images=1000 --channels=64 --dir=/tmp/...]

Writes `--num_images` feature maps of 240x320x`--channels` float16 (9.8 GB for
1,000 x 64 channels) as <index>.npy files under `--dir`, scores them through
`external.score_features` with the poster's segmenter (`kmeans`, oracle K)
against a stand-in test split of the same size (the repository's two real
CLEVR records, mirrored and shifted: `samples.py`; no dataset to prepare),
prints the peak resident memory of this process (getrusage's maxrss: on a CPU
backend the device buffers are host memory too) before and after scoring, and
deletes the files.

The features are the image and 61 fixed random mixtures of its channels plus
noise, so that K-Means has something to find; what is measured is memory, not
accuracy. `--kmeans_iterations` keeps the run short on a CPU: the memory of a
batch does not depend on how many iterations K-Means runs.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from benchmarks import samples
from clevr_jax import defaults
from clevr_jax import schema

_NUM_IMAGES = flags.DEFINE_integer("num_images", 1000, "Feature maps to write and score.")
_CHANNELS = flags.DEFINE_integer("channels", 64, "Channels per feature map (float16).")
_DIR = flags.DEFINE_string("dir", None, "Where to write them (default: a new folder in /tmp).")
_BATCH = flags.DEFINE_integer("batch", 10, "Images per evaluation batch (the default's 10).")
_ITERATIONS = flags.DEFINE_integer("kmeans_iterations", 10, "K-Means iterations (max_iter).")
_RESTARTS = flags.DEFINE_integer("kmeans_restarts", 1, "K-Means restarts.")


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


class StandInSplit:
  """A test split of `count` sample images, in the pipeline's stored form."""

  def __init__(self, count: int, batch: int) -> None:
    self.num_examples, self.batch = count, batch

  def eval_batches(self, *, process_index: int = 0, process_count: int = 1,
                   max_examples: int = 0, fields=None):
    del fields
    count = min(self.num_examples, max_examples) if max_examples else self.num_examples
    per_process = self.batch // process_count
    for start in range(0, count, self.batch):
      positions = start + process_index * per_process + np.arange(per_process)
      yield stored_batch(positions, count)


# `samples` repeats its variants every 16 images (2 records x mirrored x 4 shifts).
_PERIOD = 16


def _variants() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images [16, 240, 320, 3] float32, labels [16, 240, 320], num_masks [16])."""
  return (samples.sample_images(samples.SAMPLES_DIR, _PERIOD),
          samples.sample_labels(samples.SAMPLES_DIR, _PERIOD),
          samples.sample_num_masks(samples.SAMPLES_DIR, _PERIOD))


def stored_batch(positions: np.ndarray, count: int) -> dict[str, np.ndarray]:
  """The stored fields of the stand-in images at `positions` (past `count`: padding)."""
  images, labels, num_masks = (x[positions % _PERIOD] for x in _variants())
  valid = positions < count
  visibility = (np.arange(schema.MAX_SLOTS) < num_masks[:, None]) & valid[:, None]
  return {"image": np.round(images * 255).astype(np.uint8) * valid[:, None, None, None],
          "labels": labels.astype(np.uint8) * valid[:, None, None],
          "shape": np.zeros((len(positions), schema.MAX_SLOTS), np.uint8),
          "visibility": visibility.astype(np.uint8), "valid": valid,
          "index": np.where(valid, positions, 0).astype(np.int32)}


def write_features(folder: str, count: int, channels: int) -> float:
  """One <index>.npy per image; returns the gigabytes written."""
  rng = np.random.default_rng(0)
  mix = rng.standard_normal((3, channels - 3)).astype(np.float32)
  images = _variants()[0]
  written = 0
  for index in range(count):
    image = images[index % _PERIOD]
    noise = 0.05 * rng.standard_normal(image.shape[:2] + (channels - 3,), dtype=np.float32)
    features = np.concatenate([image, image @ mix + noise], -1).astype(np.float16)
    np.save(os.path.join(folder, f"{index}.npy"), features)
    written += features.nbytes
  return written / 1e9


def main(argv) -> None:
  del argv
  from clevr_jax.evaluation import external  # pylint: disable=g-import-not-at-top
  root = _DIR.value or tempfile.mkdtemp(prefix="clevr_jax_external_memory_")
  folder = os.path.join(root, "features")
  os.makedirs(folder, exist_ok=True)
  try:
    start = time.time()
    gigabytes = write_features(folder, _NUM_IMAGES.value, _CHANNELS.value)
    print(f"wrote {_NUM_IMAGES.value} maps of 240x320x{_CHANNELS.value} float16: "
          f"{gigabytes:.1f} GB in {time.time() - start:.0f} s", flush=True)
    config = defaults.get_config()
    config.eval.batch_size = _BATCH.value
    config.eval.segmenter_names = ("kmeans",)
    config.eval.num_figure_images = 2
    config.eval.kmeans.max_iter = _ITERATIONS.value
    config.eval.kmeans.num_restarts = _RESTARTS.value
    before = _peak_mb()
    start = time.time()
    results = external.score_features(config, folder, os.path.join(root, "out"),
                                      split=StandInSplit(_NUM_IMAGES.value, _BATCH.value))
    row = results["segmenters"]["kmeans"]["features"]
    print(f"scored {results['num_images']} images in {time.time() - start:.0f} s: poster mIoU "
          f"{row['poster_miou']:.4f}, FG-ARI {row['fg_ari']:.4f}")
    print(f"peak host memory: {before:.0f} MB before scoring, {_peak_mb():.0f} MB after "
          f"({gigabytes:.1f} GB of features on disk)")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
