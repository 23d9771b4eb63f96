"""What the pixel segmenters get wrong, counted per object: fused, cut, extra masks.

  python -m tools.segment_errors --config=configs/unet_objects.py:quick \
      --config.data.synthetic.seed=1 --config.data.synthetic.num_test=100 \
      --segmenters=split_merge_predict_k [--config.eval.segmenters.NAME.FIELD=...] \
      [--checkpoint=RUN --tap=embedding]

Runs each named segmenter (`config.eval.segmenters`) on the raw pixels of a
split, or with --checkpoint on a trained network's tap (RUN's newest
checkpoint; the hybrids read the image too), on the devices as the evaluation
does, and counts, against the true
masks (each predicted mask read as what covers most of it, each object as the
predicted mask that covers most of it):

  lost        objects whose predicted mask is the floor's
  fused       other objects whose predicted mask is also another object's; of those,
              the ones fused with an object that touches it, and with an object
              of one colour (mean Lab / 100 within
              `--same_colour`) that touches it (4-adjacent true masks)
  cut         objects with two or more predicted masks that each cover at least
              `--piece` of the object and lie mostly (over half) inside it
  extra       predicted masks that are no true mask's (background's included):
              on the floor (over half true background) a shadow when darker than
              the floor by `--darker` and touching an object, else floor; on an
              object a highlight when brighter than it by `--darker`, else a piece

and the ceiling of its regions: the regions before the merge (the clusters'
components, specks absorbed, and the shape split when set), each given to the
true mask it overlaps most, scored as a segmentation (FG-ARI, poster mIoU,
ClevrTex mIoU); and that ceiling again with every region that holds two or more
objects (each at least `--oracle_cut` of the region) cut along the true masks:
how far any split of fused regions could take it. Prints one markdown table;
--json writes the figures.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS

COUNTS = ("objects", "lost_to_floor", "fused", "fused_touching", "fused_one_colour_touching",
          "cut", "extra", "extra_shadow", "extra_floor", "extra_highlight", "extra_piece")


def define_flags() -> None:
  """The command line (defined when run, not on import: the tests import this module)."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file with ':preset'.")
  flags.DEFINE_string("split", "test", "The split to count on.")
  flags.DEFINE_list("segmenters", ["split_merge_predict_k"],
                    "Segmenters of config.eval.segmenters.")
  flags.DEFINE_float("same_colour", 0.1, "Lab / 100 distance of two objects' mean colours "
                     "under which they count as one colour.")
  flags.DEFINE_float("piece", 0.1, "A predicted mask is a piece of an object when it covers "
                     "at least this fraction of it (and lies mostly inside it).")
  flags.DEFINE_float("darker", 0.03, "Lightness (L / 100) by which a shadow is darker than the "
                     "floor, or a highlight brighter than its object.")
  flags.DEFINE_float("oracle_cut", 0.05, "The share of a region each of two objects must "
                     "hold for the oracle cut to separate them.")
  flags.DEFINE_string("json", "", "Also write the figures to this file.")
  flags.DEFINE_string("checkpoint", "", "A run's workdir: segment its network's --tap "
                      "(its newest checkpoint) instead of the raw pixels.")
  flags.DEFINE_string("tap", "embedding", "With --checkpoint: the tap to segment.")


@dataclasses.dataclass
class Tally:
  """Counts over images, and per-image scores of the labels and of the ceiling."""
  counts: dict[str, int] = dataclasses.field(
      default_factory=lambda: {name: 0 for name in COUNTS})
  scores: list[np.ndarray] = dataclasses.field(default_factory=list)
  ceiling: list[np.ndarray] = dataclasses.field(default_factory=list)
  cut_ceiling: list[np.ndarray] = dataclasses.field(default_factory=list)
  regions: list[int] = dataclasses.field(default_factory=list)


def _touching(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether two masks share a horizontal or vertical pixel edge."""
  return bool((a[:, :-1] & b[:, 1:]).any() or (b[:, :-1] & a[:, 1:]).any()
              or (a[:-1] & b[1:]).any() or (b[:-1] & a[1:]).any())


def count_errors(pred: np.ndarray, truth: np.ndarray, lab: np.ndarray, *, same_colour: float,
                 piece: float, darker: float) -> dict[str, int]:
  """One image's counts (see the module doc): pred, truth int [h, w] (truth 0 is the
  background), lab float [h, w, 3] the image in Lab / 100."""
  counts = {name: 0 for name in COUNTS}
  true_ids = [t for t in np.unique(truth) if t > 0]
  pred_ids = np.unique(pred)
  overlap = np.zeros((int(truth.max()) + 1, int(pred.max()) + 1), np.int64)
  np.add.at(overlap, (truth.ravel(), pred.ravel()), 1)
  true_area, pred_area = overlap.sum(1), overlap.sum(0)
  best = overlap.argmax(1)  # each true mask's predicted mask
  colour = {t: lab[truth == t].mean(0) for t in true_ids}
  counts["objects"] = len(true_ids)
  for t in true_ids:
    if best[t] == best[0]:
      counts["lost_to_floor"] += 1
      continue
    others = [u for u in true_ids if u != t and best[u] == best[t]]
    if others:
      counts["fused"] += 1
      counts["fused_touching"] += any(_touching(truth == t, truth == u) for u in others)
      if any(np.linalg.norm(colour[t] - colour[u]) < same_colour
             and _touching(truth == t, truth == u) for u in others):
        counts["fused_one_colour_touching"] += 1
    pieces = [p for p in pred_ids if overlap[t, p] >= piece * true_area[t]
              and overlap[t, p] > 0.5 * pred_area[p]]
    counts["cut"] += len(pieces) >= 2
  matched = set(best[[0, *true_ids]].tolist())
  floor_l = lab[truth == 0, 0].mean() if (truth == 0).any() else 0.0
  objects = truth > 0
  for p in pred_ids:
    if p in matched:
      continue
    counts["extra"] += 1
    mask = pred == p
    mean_l = lab[mask, 0].mean()
    owner = int(overlap[:, p].argmax())
    if owner == 0:
      shadow = mean_l < floor_l - darker and _touching(mask, objects)
      counts["extra_shadow" if shadow else "extra_floor"] += 1
    else:
      bright = mean_l > lab[truth == owner, 0].mean() + darker
      counts["extra_highlight" if bright else "extra_piece"] += 1
  return counts


def perfect_merge(regions: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """Each region relabelled as the true mask it overlaps most."""
  overlap = np.zeros((int(regions.max()) + 1, int(truth.max()) + 1), np.int64)
  np.add.at(overlap, (regions.ravel(), truth.ravel()), 1)
  return overlap.argmax(1)[regions]


def oracle_cut(regions: np.ndarray, truth: np.ndarray, share: float) -> np.ndarray:
  """Each region that holds two or more objects, each at least `share` of it, cut
  along the true masks (a region's pixels of its second object and beyond get new
  labels)."""
  out = regions.astype(np.int64)
  fresh = int(regions.max()) + 1
  for r in np.unique(regions):
    inside = regions == r
    counts = np.bincount(truth[inside])
    objects = [t for t in range(1, len(counts)) if counts[t] >= max(share * inside.sum(), 1)]
    for t in objects[1:]:
      out[inside & (truth == t)] = fresh
      fresh += 1
  return out


def score_maps(pred: np.ndarray, truth: np.ndarray, num_masks: np.ndarray, slots: int
           ) -> np.ndarray:
  """[B, 3]: FG-ARI, poster mIoU, ClevrTex mIoU of label maps [B, h, w]."""
  from clevr_jax import metrics, schema  # pylint: disable=import-outside-toplevel
  tables = metrics.contingency_host(truth, pred, schema.MAX_SLOTS, slots)
  s = metrics.score_tables(tables, num_masks)
  return np.stack([s.fg_ari, s.poster_miou, s.clevrtex_miou], 1)


def input_error(config, segmenter_names: Sequence[str], checkpoint: str, tap: str
                ) -> str | None:
  """What is wrong with the command line, as one line that says what to pass; None if
  nothing is."""
  import os  # pylint: disable=import-outside-toplevel
  from clevr_jax import models  # pylint: disable=import-outside-toplevel
  from clevr_jax.segmentation import segmenters  # pylint: disable=import-outside-toplevel
  unknown = [n for n in segmenter_names if n not in config.eval.segmenters]
  if unknown:
    return (f"--segmenters names {unknown}, not segmenters of the config "
            f"({sorted(config.eval.segmenters.keys())})")
  try:
    for name in segmenter_names:
      segmenters.from_config(name, config.eval.segmenters[name]).check()
  except ValueError as e:
    return str(e)
  if checkpoint:
    if not os.path.isdir(os.path.join(checkpoint, "checkpoints")):
      return (f"--checkpoint={checkpoint} holds no checkpoints/ folder; pass a training "
              "run's workdir")
    if tap not in models.config_tap_names(config):
      return (f"--tap={tap} is not a tap of the config's network "
              f"({list(models.config_tap_names(config))})")
  return None


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from clevr_jax import schema, sharding  # pylint: disable=import-outside-toplevel
  from clevr_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from clevr_jax.evaluation import model_eval, protocol
  # pylint: disable-next=import-outside-toplevel
  from clevr_jax.segmentation import kmeans, segmenters, transforms
  from clevr_jax.training import checkpoints  # pylint: disable=import-outside-toplevel

  config = FLAGS.config
  ev = config.eval
  error = input_error(config, FLAGS.segmenters, FLAGS.checkpoint, FLAGS.tap)
  if error:
    sys.exit(f"error: {error}")
  chosen = [segmenters.from_config(n, ev.segmenters[n]) for n in FLAGS.segmenters]
  mesh = sharding.make_mesh()
  tap = FLAGS.tap if FLAGS.checkpoint else "pixels"
  features_of = lambda batch: batch["image"]
  if FLAGS.checkpoint:
    config.eval.taps, config.eval.hypercolumns = (FLAGS.tap,), ()
    try:
      state, model = checkpoints.restore_model(config, FLAGS.checkpoint, mesh)
    except (FileNotFoundError, ValueError) as e:  # none, another network's, none readable
      sys.exit(f"error: --checkpoint={FLAGS.checkpoint}: {e}")
    taps_of = model_eval.tap_features_fn(state, model, config)
    features_of = lambda batch: taps_of(batch)[FLAGS.tap]

  # The evaluation's own device programs: the labels are the ones it scores. The
  # regions before the merge come from the same segmenter without it, with R
  # label slots (eval.max_regions) so that nothing is merged.
  runner = protocol.Runner(config, mesh, chosen)
  unmerged = {s.name: dataclasses.replace(s, merge=False) for s in chosen}
  unmerged_runner = protocol.Runner(config, mesh, list(unmerged.values()),
                                    slots=ev.max_regions)

  to_lab = jax.jit(transforms.rgb_to_lab)
  tallies = {s.name: Tally() for s in chosen}
  ideal_tallies = {s.name: Tally() for s in chosen}
  split = pipeline.Split(config, FLAGS.split)
  for batch in protocol.host_batches(config, split, mesh):
    keys = kmeans.image_keys(config.seed, batch["index"])
    features = features_of(batch)
    host = {k: sharding.to_host(batch[k]) for k in ("image", "instance_labels", "num_masks",
                                                    "valid")}
    valid = host["valid"]
    truth, num_masks = host["instance_labels"], host["num_masks"]
    lab = np.asarray(to_lab(host["image"]))
    for s in chosen:
      pred = sharding.to_host(runner.dispatch(s, tap, features, batch, keys)[1])
      regions = sharding.to_host(
          unmerged_runner.dispatch(unmerged[s.name], tap, features, batch, keys)[1])
      tally = tallies[s.name]
      ideal = np.stack([perfect_merge(r, t) for r, t in zip(regions, truth)])
      for b in np.flatnonzero(valid):
        for labels, counted in ((pred, tally), (ideal, ideal_tallies[s.name])):
          found = count_errors(labels[b], truth[b], lab[b], same_colour=FLAGS.same_colour,
                               piece=FLAGS.piece, darker=FLAGS.darker)
          for name, value in found.items():
            counted.counts[name] += value
        tally.regions.append(len(np.unique(regions[b])))
      tally.scores.append(score_maps(pred, truth, num_masks, runner.slots)[valid])
      tally.ceiling.append(score_maps(ideal, truth, num_masks, schema.MAX_SLOTS)[valid])
      cut = np.stack([perfect_merge(oracle_cut(r, t, FLAGS.oracle_cut), t)
                      for r, t in zip(regions, truth)])
      tally.cut_ceiling.append(score_maps(cut, truth, num_masks, schema.MAX_SLOTS)[valid])

  rows = {}
  print("| segmenter | FG-ARI / poster mIoU / ClevrTex mIoU | ceiling (regions merged "
        "perfectly) | ceiling, regions of two objects cut by the truth | regions per image | "
        + " | ".join(COUNTS) + " |")
  print("|---" * (5 + len(COUNTS)) + "|")
  for name, tally in tallies.items():
    perfect = ideal_tallies[name].counts
    scores = np.concatenate(tally.scores).mean(0)
    ceiling = np.concatenate(tally.ceiling).mean(0)
    cut_ceiling = np.concatenate(tally.cut_ceiling).mean(0)
    rows[name] = dict(scores=scores.tolist(), ceiling=ceiling.tolist(),
                      cut_ceiling=cut_ceiling.tolist(),
                      regions=float(np.mean(tally.regions)), counts=tally.counts,
                      ceiling_counts=perfect)
    print(f"| {name} | {' / '.join(f'{v:.3f}' for v in scores)} | "
          f"{' / '.join(f'{v:.3f}' for v in ceiling)} | "
          f"{' / '.join(f'{v:.3f}' for v in cut_ceiling)} | {np.mean(tally.regions):.1f} | "
          + " | ".join(str(tally.counts[c]) for c in COUNTS) + " |")
    print(f"| {name}, regions merged perfectly | | | | | "
          + " | ".join(str(perfect[c]) for c in COUNTS) + " |")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
