"""A joint grid of a pixel segmenter's merge settings, scored on one split.

  python -m tools.merge_grid --config=configs/unet_objects.py:quick \
      --config.data.synthetic.seed=1 --config.data.synthetic.num_test=100 \
      --segmenter=split_merge_predict_k --factors=1,1.5,2 --thresholds=0.15,0.2,0.25

Runs the named segmenter (`config.eval.segmenters`) on the raw pixels of a split,
on the devices as the evaluation does, for every pair of `border_merge_factor`
(`--factors`) and `merge_threshold` (`--thresholds`; ignored by a segmenter
that merges to a target K): the transform and K-Means run once per batch, only
the post-processing once per pair. Prints one markdown table, a row per pair:
FG-ARI, poster mIoU and ClevrTex mIoU over the split, and the error counts of
`tools.segment_errors` (objects lost to the floor, fused, cut; extra masks and
the shadows among them). --json writes the figures.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from tools import segment_errors

FLAGS = flags.FLAGS

SHOWN = ("lost_to_floor", "fused", "cut", "extra", "extra_shadow")


def define_flags() -> None:
  """The command line (defined when run, not on import)."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file with ':preset'.")
  flags.DEFINE_string("split", "test", "The split to score.")
  flags.DEFINE_string("segmenter", "split_merge_predict_k", "One of config.eval.segmenters.")
  flags.DEFINE_list("factors", ["1", "1.5"], "border_merge_factor values.")
  flags.DEFINE_list("thresholds", ["0.2"], "merge_threshold values.")
  flags.DEFINE_string("json", "", "Also write the figures to this file.")


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from clevr_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from clevr_jax.segmentation import kmeans, segmenters, transforms
  from clevr_jax.training import batch as batch_lib  # pylint: disable=import-outside-toplevel

  config = FLAGS.config
  ev = config.eval
  base = segmenters.from_config(FLAGS.segmenter, ev.segmenters[FLAGS.segmenter])
  factors = [float(f) for f in FLAGS.factors]
  thresholds = [float(t) for t in FLAGS.thresholds] if base.predicts_k else [0.0]
  settings = [(f, t) for f in factors for t in thresholds]
  variants = {f: dataclasses.replace(base, border_merge_factor=f) for f in factors}
  for s in variants.values():
    s.check()
  cap = base.k_max

  @jax.jit
  def cluster(image, index, num_masks):
    keys = kmeans.image_keys(config.seed, index)
    return segmenters.transform_and_cluster(
        base, ev.kmeans, image, segmenters.cluster_k(base, num_masks), keys, is_pixels=True)

  def finish(segmenter, x, labels, num_masks, threshold):
    target, _ = segmenters.merge_rule(segmenter, segmenters.target_k(segmenter, num_masks),
                                      "pixels", cap)
    # A segmenter that merges to a target K has no threshold: it never stops early.
    limit = jnp.full_like(target, threshold if segmenter.predicts_k else jnp.inf,
                          dtype=jnp.float32)
    return segmenters.postprocess(segmenter, labels, x, target, limit, max_regions=ev.max_regions,
                                  cap=cap)[0]

  programs = {f: jax.jit(lambda *a, s=s: finish(s, *a)) for f, s in variants.items()}
  to_lab = jax.jit(transforms.rgb_to_lab)
  scores = {key: [] for key in settings}
  counts = {key: {name: 0 for name in segment_errors.COUNTS} for key in settings}
  for batch in pipeline.Split(config, FLAGS.split).eval_batches():
    batch = {k: np.asarray(v) for k, v in batch_lib.derive(batch, config).items()}
    valid = batch["valid"]
    image, truth, num_masks = batch["image"], batch["instance_labels"], batch["num_masks"]
    lab = np.asarray(to_lab(image))
    x, labels = cluster(image, batch["index"], num_masks)
    for f, t in settings:
      pred = np.asarray(programs[f](x, labels, num_masks, np.float32(t)))
      scores[(f, t)].append(segment_errors.score_maps(pred, truth, num_masks, cap)[valid])
      for b in np.flatnonzero(valid):
        found = segment_errors.count_errors(pred[b], truth[b], lab[b], same_colour=0.1,
                                            piece=0.1, darker=0.03)
        for name, value in found.items():
          counts[(f, t)][name] += value

  rows = []
  print(f"| {base.name}: border_merge_factor | merge_threshold | FG-ARI / poster mIoU / "
        "ClevrTex mIoU | " + " | ".join(SHOWN) + " |")
  print("|---" * (3 + len(SHOWN)) + "|")
  for f, t in settings:
    mean = np.concatenate(scores[(f, t)]).mean(0)
    rows.append(dict(factor=f, threshold=t, scores=mean.tolist(), counts=counts[(f, t)]))
    print(f"| {f:g} | {t:g} | {' / '.join(f'{v:.3f}' for v in mean)} | "
          + " | ".join(str(counts[(f, t)][c]) for c in SHOWN) + " |", flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
