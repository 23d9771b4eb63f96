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
"""

from __future__ import annotations

import itertools
import sys
from typing import Sequence

from absl import app
from absl import flags

from configs import unet_rgb


METRICS = ("poster_miou", "fg_ari", "clevrtex_miou", "k_error")


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


def main(argv: Sequence[str]) -> None:
  del argv
  if not flags.FLAGS.eval_file or not flags.FLAGS.workdir:
    sys.exit("error: --eval_file and --workdir are required")
  from clevr_jax import evaluation  # pylint: disable=import-outside-toplevel
  config = unet_rgb.get_config("")
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
  names = []
  for i, spec in enumerate(settings):
    name = f"variant_{i:02d}"
    config.eval.segmenters[name] = spec
    names.append(name)
  config.eval.segmenter_names = tuple(names)
  results = evaluation.baselines(config, flags.FLAGS.workdir)
  print("| " + " | ".join(list(vary) + list(METRICS)) + " |")
  print("|" + "---|" * (len(vary) + len(METRICS)))
  for name, spec in zip(names, settings):
    scores = results["segmenters"][name]["pixels"]
    cells = [f"{spec[k]:g}" for k in vary] + [
        f"{scores[m]:.4f}" if m in scores else "" for m in METRICS]
    print("| " + " | ".join(cells) + " |")
  print(f"({results['num_images']} images, {flags.FLAGS.height}x{flags.FLAGS.width}; "
        f"row 1 is {flags.FLAGS.base}'s defaults)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
