r"""The whole segmenter: the device program against the SciPy reference.

  python -m benchmarks.segmenter_benchmark [--batch=16 --repeats=3 --sizes=240x320,96x128]

A batch of `--batch` real CLEVR images (the two `clevr_with_masks` records,
mirrored and shifted: `samples.py`), resized to each size, goes through each
configured segmenter (clevr_jax.defaults) with the oracle K from its masks:

  device     `segmenters.segment` and the contingency tables, one jitted
             program (transform, K-Means, post-processing, counts); the
             first call's extra time is its compile
  reference  the same transform and K-Means jitted on the device, then the
             SciPy post-processing (`postprocess_reference.py`) one image at a
             time on the host and the tables in NumPy

With --shape_split, every segmenter that splits its clusters into components
also cuts regions at narrow waists (`shape_split`), on both sides; with
--border_merge_factor, every merging segmenter takes that factor.

Wall time per batch, the best of `--repeats` after a warm-up call, as images/s
(wall, not CPU time: the device program uses every core, the host path one).
Both columns' mean poster mIoU and FG-ARI on these images say that they agree.
"""

from __future__ import annotations

import dataclasses
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clevr_jax import defaults
from clevr_jax import metrics
from clevr_jax import schema
from clevr_jax.segmentation import kmeans
from tests.oracles import postprocess_reference
from clevr_jax.segmentation import segmenters as segmenters_lib
from benchmarks import samples

_SAMPLES = flags.DEFINE_string(
    "samples", samples.SAMPLES_DIR,
    "Folder of sample_{0,1}.npz (image [240, 320, 3] uint8, mask [11, 240, 320, 1]).")
_BATCH = flags.DEFINE_integer("batch", 16, "Images per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed batches (best kept), after a warm-up.")
_SIZES = flags.DEFINE_list("sizes", ["240x320", "96x128"], "Image sizes HxW.")
_SEGMENTERS = flags.DEFINE_list("segmenters", [], "Segmenter names (default: all configured).")
_SHAPE_SPLIT = flags.DEFINE_bool("shape_split", False, "Turn on each splitting segmenter's "
                                 "shape split (regions cut at narrow waists).")
_BORDER = flags.DEFINE_float("border_merge_factor", 0.0, "Set every segmenter's "
                             "border_merge_factor (0: each keeps its own).")


def _resize(images: np.ndarray, labels: np.ndarray, h: int, w: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Images (antialiased) and labels (nearest) at h x w."""
  b, height, width, _ = images.shape
  if (h, w) == (height, width):
    return images, labels
  small = np.asarray(jax.image.resize(jnp.asarray(images), (b, h, w, 3), "linear"))
  rows = ((np.arange(h) + 0.5) * height / h).astype(int)
  cols = ((np.arange(w) + 0.5) * width / w).astype(int)
  return small, labels[:, rows][:, :, cols]


def _best_of(fn, repeats):
  out = fn()  # warm-up (compiles)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return out, best


def _scores(tables, num_masks):
  s = metrics.score_tables(np.asarray(tables), num_masks)
  return float(np.mean(s.poster_miou)), float(np.mean(s.fg_ari))


def main(argv):
  del argv
  config = defaults.base_config()
  km = config.eval.kmeans
  chosen = [s for s in segmenters_lib.configured(config)
            if not _SEGMENTERS.value or s.name in _SEGMENTERS.value]
  if _SHAPE_SPLIT.value:
    chosen = [dataclasses.replace(s, shape_split=s.split) for s in chosen]
  if _BORDER.value:
    chosen = [dataclasses.replace(s, border_merge_factor=_BORDER.value) for s in chosen]
  slots = max(s.k_max for s in chosen)
  r = config.eval.max_regions
  b = _BATCH.value
  images = samples.sample_images(_SAMPLES.value, b)
  truth = samples.sample_labels(_SAMPLES.value, b)
  ks = samples.sample_num_masks(_SAMPLES.value, b)
  keys = kmeans.image_keys(config.seed, jnp.arange(b))
  print(f"The whole segmenter on {b} real images per batch, oracle K; wall time, best of "
        f"{_REPEATS.value} batches after a warm-up; JAX on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s)); R = {r}.\n")
  print("| size | segmenter | device images/s | compile s | reference images/s "
        "| device / reference | mIoU device / ref | FG-ARI device / ref |")
  print("|---|---|---|---|---|---|---|---|")
  for size in _SIZES.value:
    h, w = map(int, size.split("x"))
    x, t = _resize(images, truth, h, w)
    x, t, k = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ks)
    for seg in chosen:
      @jax.jit
      def device(x, t, k, seg=seg):
        target, threshold = segmenters_lib.merge_rule(seg, segmenters_lib.target_k(seg, k),
                                                      "pixels", slots)
        labels, counts = segmenters_lib.segment(
            seg, km, x, segmenters_lib.cluster_k(seg, k), keys, target, threshold,
            is_pixels=True, max_regions=r, cap=slots)
        labels = kmeans.upsample_labels(labels, h, w)
        return metrics.contingency(t, labels, schema.MAX_SLOTS, slots), counts

      start = time.perf_counter()
      jax.block_until_ready(device(x, t, k))
      first = time.perf_counter() - start
      (tables, counts), dev_s = _best_of(
          lambda: jax.block_until_ready(device(x, t, k)), _REPEATS.value)
      segmenters_lib.check_region_counts(np.asarray(counts), r, size)
      compile_s = first - dev_s

      cluster = jax.jit(lambda x, k, seg=seg: segmenters_lib.transform_and_cluster(
          seg, km, x, segmenters_lib.cluster_k(seg, k), keys, is_pixels=True))
      target = np.asarray(segmenters_lib.target_k(seg, k))

      def reference(seg=seg, cluster=cluster, target=target):
        feats, labels = (np.asarray(a) for a in cluster(x, k))
        if seg.post_processes:
          labels = np.stack([postprocess_reference.postprocess_one(
              labels[i], feats[i], modal_size=seg.modal_size, split=seg.split,
              min_area=int(round(seg.min_area * h * w)), merge=seg.merge, metric=seg.metric,
              target=int(target[i]),
              threshold=seg.merge_threshold if seg.predicts_k else None, max_regions=slots,
              shape_split_args=segmenters_lib.shape_split_args(seg, h, w), region_slots=r,
              border_factor=seg.border_merge_factor, refine_steps=seg.refine_steps)
              for i in range(b)])
        return metrics.contingency_host(np.asarray(t), labels, schema.MAX_SLOTS, slots)

      ref_tables, ref_s = _best_of(reference, _REPEATS.value)
      dm, da = _scores(tables, ks)
      rm, ra = _scores(ref_tables, ks)
      print(f"| {size} | {seg.name} | {b / dev_s:.1f} | {compile_s:.1f} | {b / ref_s:.1f} | "
            f"{ref_s / dev_s:.2f}x | {dm:.3f} / {rm:.3f} | {da:.3f} / {ra:.3f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
