"""Pixel segmenters' settings scored side by side on an official-format file.

  python -m tools.segmenter_sweep --eval_file=FILE.tfrecord --workdir=W \
      --base=split_merge_predict_k --vary='min_area=5e-4,2e-3;modal_size=0;merge_threshold=0.15,0.25'

Starts from the default segmenter `--base` (clevr_jax/defaults.py) and scores
it with one setting changed at a time (each value of `--vary` a variant; with
--grid, every combination instead) on the raw pixels of `--eval_file`, in one
`--mode=baselines` pass: the K-Means program is shared, settings that are
inputs of the device programs (the merge threshold) compile nothing new.
Prints a table (poster mIoU, FG-ARI, ClevrTex mIoU, k_error) and writes
baselines.json/md in --workdir.

On a trained network's tap instead of the raw pixels:

  python -m tools.segmenter_sweep --eval_file=FILE.tfrecord --workdir=W \
      --config=configs/unet_objects.py:quick --checkpoint=RUN --tap=embedding --seed=2 \
      --base=hybrid_predict_k --vary='tap_merge_threshold=0.5,0.7;colour_merge_threshold=0.15'

restores RUN's newest checkpoint (W/checkpoints links to RUN's), scores the
variants on --tap and the pixels' `--reference` segmenter on the input in one
`--mode=evaluate` pass (the seed sets the K-Means keys of both), prints each
variant's scores and their difference from the reference, and writes
results.json/md in --workdir.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
from typing import Sequence

from absl import app
from absl import flags

import ml_collections


METRICS = ("poster_miou", "fg_ari", "clevrtex_miou", "k_error")
# The metrics the hybrid must beat the pixels on, in the order reports print them.
MARGINS = ("fg_ari", "poster_miou", "clevrtex_miou")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/NAME.py[:preset]' -> that module's get_config(preset)."""
  path, _, preset = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if os.path.dirname(os.path.normpath(path)) != "configs" or not path.endswith(".py"):
    raise ValueError(f"--config={spec}: expected configs/NAME.py[:preset]")
  try:
    module = importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError as e:
    raise ValueError(f"--config={spec}: no such config ({e})") from e
  try:
    return module.get_config(preset)
  except ValueError as e:
    raise ValueError(f"--config={spec}: {e}") from e


def parse_vary(text: str) -> dict[str, list[float]]:
  """'a=1,2;b=3' -> {'a': [1.0, 2.0], 'b': [3.0]} (ints stay ints)."""
  fields = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    name, _, values = part.partition("=")
    if not values:
      raise ValueError(f"--vary: {part!r} is not FIELD=V1,V2")
    fields[name.strip()] = [int(v) if v.strip().lstrip("-").isdigit() else float(v)
                            for v in values.split(",")]
  return fields


def variants(base: dict, vary: dict[str, list[float]], grid: bool) -> list[dict]:
  """The base settings first, then each change (or each combination)."""
  out = [dict(base)]
  if grid:
    names = list(vary)
    for values in itertools.product(*(vary[n] for n in names)):
      changed = dict(base, **dict(zip(names, values)))
      if changed not in out:
        out.append(changed)
  else:
    for name, values in vary.items():
      for value in values:
        changed = dict(base, **{name: value})
        if changed not in out:
          out.append(changed)
  return out


def define_flags() -> None:
  """The command line (defined when run, not on import: the tests import this module)."""
  flags.DEFINE_string("eval_file", None, "An official-format GZIP TFRecord.")
  flags.DEFINE_string("workdir", None, "Where baselines.json/md are written.")
  flags.DEFINE_string("base", "split_merge_predict_k", "The default segmenter varied.")
  flags.DEFINE_string(
      "vary", "min_area=5e-4,2e-3;modal_size=0;merge_threshold=0.15,0.25",
      "FIELD=V1,V2;FIELD=...: the values tried for each field.")
  flags.DEFINE_bool("grid", False, "Every combination instead of one change at a time.")
  flags.DEFINE_integer("height", 96, "Images are resized to this height.")
  flags.DEFINE_integer("width", 128, "Images are resized to this width.")
  flags.DEFINE_integer("max_images", 0, "The first N images (0: all).")
  flags.DEFINE_integer("batch_size", 10, "Images per evaluation batch.")
  flags.DEFINE_string("config", "configs/unet_rgb.py",
                      "configs/NAME.py[:preset]: the segmenters' defaults (and the network "
                      "of --checkpoint).")
  flags.DEFINE_string("checkpoint", None,
                      "A training run's workdir: score its network's --tap, not the pixels.")
  flags.DEFINE_string("tap", "embedding", "With --checkpoint: the tap the variants score.")
  flags.DEFINE_string("reference", "split_merge_predict_k",
                      "With --checkpoint: the segmenter scored on the input beside them.")
  flags.DEFINE_integer("seed", None, "config.seed (the K-Means keys); default: the config's.")


def main(argv: Sequence[str]) -> None:
  del argv
  if not flags.FLAGS.eval_file or not flags.FLAGS.workdir:
    sys.exit("error: --eval_file and --workdir are required")
  from clevr_jax import evaluation  # pylint: disable=import-outside-toplevel
  try:
    config = load_config(flags.FLAGS.config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if flags.FLAGS.seed is not None:
    config.seed = flags.FLAGS.seed
  if flags.FLAGS.base not in config.eval.segmenters:
    sys.exit(f"error: --base={flags.FLAGS.base} is not a segmenter of clevr_jax/defaults.py "
             f"({sorted(config.eval.segmenters.keys())})")
  try:
    vary = parse_vary(flags.FLAGS.vary)
  except ValueError as e:
    sys.exit(f"error: {e}")
  base = config.eval.segmenters[flags.FLAGS.base].to_dict()
  unknown = set(vary) - set(base)
  if unknown:
    sys.exit(f"error: --vary names {sorted(unknown)}, not fields of {flags.FLAGS.base} "
             f"({sorted(base)})")
  config.data.eval_file = flags.FLAGS.eval_file
  config.data.image_height, config.data.image_width = flags.FLAGS.height, flags.FLAGS.width
  config.eval.batch_size = flags.FLAGS.batch_size
  config.eval.max_images = flags.FLAGS.max_images
  settings = variants(base, vary, flags.FLAGS.grid)
  checkpoint, tap = flags.FLAGS.checkpoint, flags.FLAGS.tap
  if checkpoint:
    if not os.path.isdir(os.path.join(checkpoint, "checkpoints")):
      sys.exit(f"error: --checkpoint={checkpoint} holds no checkpoints/ folder; pass a "
               "training run's workdir")
    from clevr_jax import models  # pylint: disable=import-outside-toplevel
    if tap not in models.config_tap_names(config):
      sys.exit(f"error: --tap={tap} is not a tap of {flags.FLAGS.config}'s network "
               f"({list(models.config_tap_names(config))})")
    if flags.FLAGS.reference not in config.eval.segmenters:
      sys.exit(f"error: --reference={flags.FLAGS.reference} is not a segmenter of "
               f"{flags.FLAGS.config} ({sorted(config.eval.segmenters.keys())})")
  names = []
  for i, spec in enumerate(settings):
    name = f"variant_{i:02d}"
    config.eval.segmenters[name] = dict(spec, taps=(tap,)) if checkpoint else spec
    names.append(name)
  if checkpoint:
    config.eval.segmenters["reference"] = dict(
        config.eval.segmenters[flags.FLAGS.reference].to_dict(), taps=("input",))
    config.eval.segmenter_names = tuple(names) + ("reference",)
    config.eval.taps, config.eval.hypercolumns = ("input", tap), ()
    results = evaluation.evaluate(config, _linked_workdir(flags.FLAGS.workdir, checkpoint))
    scored, reference = tap, results["segmenters"]["reference"]["input"]
  else:
    config.eval.segmenter_names = tuple(names)
    results = evaluation.baselines(config, flags.FLAGS.workdir)
    scored, reference = "pixels", None
  columns = list(vary) + list(METRICS)
  if reference:
    columns += ["minus the pixels: " + " / ".join(MARGINS)]
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  if reference:
    print("| " + " | ".join([f"pixels, {flags.FLAGS.reference}"] + [""] * max(len(vary) - 1, 0) + [
        f"{reference[m]:.4f}" if m in reference else "" for m in METRICS] + [""]) + " |")
  for name, spec in zip(names, settings):
    scores = results["segmenters"][name][scored]
    cells = [f"{spec[k]:g}" for k in vary] + [
        f"{scores[m]:.4f}" if m in scores else "" for m in METRICS]
    if reference:
      cells.append(" / ".join(f"{scores[m] - reference[m]:+.4f}" for m in MARGINS))
    print("| " + " | ".join(cells) + " |")
  print(f"({results['num_images']} images, {flags.FLAGS.height}x{flags.FLAGS.width}; "
        f"the first variant is {flags.FLAGS.base}'s defaults"
        + (f" on {tap} of {checkpoint}, seed {config.seed})" if checkpoint else ")"))


def _linked_workdir(workdir: str, run: str) -> str:
  """`workdir` with checkpoints/ linked to `run`'s, so that the scores land in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  link = os.path.join(workdir, "checkpoints")
  target = os.path.abspath(os.path.join(run, "checkpoints"))
  if os.path.islink(link) and os.path.realpath(link) != os.path.realpath(target):
    os.remove(link)
  if not os.path.lexists(link):
    os.symlink(target, link)
  elif os.path.realpath(link) != os.path.realpath(target):
    sys.exit(f"error: {link} exists and is not a link to {target}; pass another --workdir")
  return workdir


if __name__ == "__main__":
  define_flags()
  app.run(main)
