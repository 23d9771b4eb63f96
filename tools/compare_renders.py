"""Synthetic scenes beside real CLEVR renders: a figure and tables of numbers.

  python -m tools.compare_renders --renders_dir=DIR --out docs/synthetic_vs_real.png
  python -m tools.compare_renders --records=FILE.tfrecord[,FILE2...] [--scene=cube_scale=0.7071]

The figure (with `--renders_dir`: a folder of img*.png, 240x320; the
repository does not ship them) puts 8 synthetic scenes (seeds 0-7) beside real
CLEVR renders. The first table compares the background-pixel fraction and the
mean background colour of the two real `clevr_with_masks` samples (by default
the ones in tests/data) with those of `--num_scenes` synthetic scenes. With
`--records` (official-format files, e.g. tools/render_clevr.py's renders), a
second table sets the scene statistics of `scene_stats` side by side for the
synthetic scenes, each file and the real samples. `--scene` renders the
synthetic scenes with other `renderer.SceneConfig` settings (numbers and
switches), to measure what a setting moves.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from clevr_jax import schema
from clevr_jax.data import renderer

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_SHOWN = 8  # scenes per side of the figure


def _folder(path: str, flag: str) -> pathlib.Path:
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a folder: point --{flag} at one")
  return folder


def load_real_renders(renders_dir: str) -> list[np.ndarray]:
  """The real CLEVR renders as RGB uint8 [240, 320, 3] (alpha dropped)."""
  folder = _folder(renders_dir, "renders_dir")
  paths = sorted(folder.glob("img*.png"),
                 key=lambda p: int(p.stem.removeprefix("img")))
  if not paths:
    raise FileNotFoundError(f"no img*.png in {folder}")
  return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def load_real_samples(samples_dir: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """The real clevr_with_masks samples as (image [H, W, 3], background [H, W])."""
  folder = _folder(samples_dir, "samples_dir")
  samples = []
  for path in sorted(folder.glob("sample_*.npz")):
    with np.load(path) as sample:
      samples.append((sample["image"], sample["mask"][0, ..., 0] > 127))
  if not samples:
    raise FileNotFoundError(f"no sample_*.npz in {folder}")
  return samples


def background_stats(image: np.ndarray, background: np.ndarray
                     ) -> tuple[float, np.ndarray]:
  """(background-pixel fraction, mean background RGB) of one image."""
  return float(background.mean()), image[background].mean(axis=0)


# Background pixels within this many pixels (at 240 rows) of an object are its
# surroundings, where its shadow falls; farther ones are open floor.
_RING = 12
# A surrounding pixel darker than this fraction of its row's floor level is shadow.
_SHADOW = 0.9
# Of the shadow, what is darker than this fraction is its core (the rest penumbra).
_CORE = 0.6

STAT_NAMES = {
    "background": "background fraction",
    "object_area": "median object area (fraction)",
    "floor_lum": "floor luminance (mean)",
    "floor_gradient": "floor gradient (bottom - top third)",
    "floor_rgb": "floor RGB (mean)",
    "shadow_depth": "shadow depth (1 - p5 / floor)",
    "shadow_area": "shadow fraction of surroundings",
    "penumbra": "penumbra share of shadow",
    "noise": "floor noise (grey levels, 3x3 residual)",
}


def scene_stats(image: np.ndarray, labels: np.ndarray) -> dict[str, object]:
  """Floor, shadow, size and noise statistics of one scene (image uint8, labels [H, W]).

  Luminance is relative to each row's median floor level, which takes out the
  floor's gradient; shadows are read in the objects' surroundings.
  """
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  lum = image.astype(np.float64) @ np.array(schema.LUMINANCE_WEIGHTS) / 255.0
  height = labels.shape[0]
  background = labels == 0
  ring = max(1, round(_RING * height / 240))
  near = ndimage.binary_dilation(~background, iterations=ring) & background
  open_floor = background & ~near
  levels = np.array([np.median(row[mask]) if mask.sum() >= 8 else np.nan
                     for row, mask in zip(lum, open_floor)])
  relative = lum / levels[:, None]
  around = relative[near & np.isfinite(relative)]
  shadow = around < _SHADOW
  residual = lum - ndimage.uniform_filter(lum, 3)
  inner = ndimage.binary_erosion(open_floor, iterations=2)
  third = height // 3
  top, bottom = open_floor[:third], open_floor[-third:]
  areas = [float((labels == k).mean()) for k in np.unique(labels) if k != 0]
  return {
      "background": float(background.mean()),
      "object_area": areas,
      "floor_lum": float(lum[open_floor].mean()),
      "floor_gradient": float(lum[-third:][bottom].mean() - lum[:third][top].mean()),
      "floor_rgb": image[open_floor].mean(axis=0),
      "shadow_depth": float(1.0 - np.percentile(around, 5)) if around.size else np.nan,
      "shadow_area": float(shadow.mean()) if around.size else np.nan,
      "penumbra": float((shadow & (around >= _CORE)).sum() / max(shadow.sum(), 1)),
      "noise": float(residual[inner].std() * 255.0),
  }


def summarise(stats: Sequence[dict[str, object]]) -> dict[str, str]:
  """Mean over scenes (the median over all objects for object_area), as text."""
  out = {}
  for key in STAT_NAMES:
    if key == "object_area":
      out[key] = f"{np.median(np.concatenate([s[key] for s in stats])):.4f}"
    elif key == "floor_rgb":
      out[key] = _rgb(np.mean([s[key] for s in stats], axis=0))
    else:
      out[key] = f"{np.nanmean([s[key] for s in stats]):.3f}"
  return out


def stats_table(columns: dict[str, Sequence[dict[str, object]]]) -> str:
  """Markdown: one row per statistic, one column per source (its scene count)."""
  summaries = {name: summarise(stats) for name, stats in columns.items()}
  heads = [f"{name} ({len(stats)})" for name, stats in columns.items()]
  lines = ["| statistic | " + " | ".join(heads) + " |",
           "|---|" + "---|" * len(heads)]
  for key, label in STAT_NAMES.items():
    lines.append(f"| {label} | " + " | ".join(s[key] for s in summaries.values()) + " |")
  return "\n".join(lines)


def record_stats(path: str, limit: int) -> list[dict[str, object]]:
  from clevr_jax.data import official  # pylint: disable=import-outside-toplevel  (TensorFlow)
  stats = []
  for _, example in official.read_records(path, 0, limit or None):
    stats.append(scene_stats(example["image"], schema.masks_to_labels(example["mask"])))
  return stats


def _rgb(colour: np.ndarray) -> str:
  return "(" + ", ".join(f"{value:5.1f}" for value in colour) + ")"


def _table(real: list[tuple[float, np.ndarray]],
           synthetic: list[tuple[float, np.ndarray]]) -> str:
  fractions = np.array([fraction for fraction, _ in synthetic])
  colours = np.array([colour for _, colour in synthetic])
  row = "{:24s} {:>11s} {:>7s} {:>7s}   {}"
  lines = [row.format("", "background", "min", "max", "mean background RGB")]
  for index, (fraction, colour) in enumerate(real):
    lines.append(row.format(f"real sample_{index}", f"{fraction:.3f}", "", "",
                            _rgb(colour)))
  lines.append(row.format(
      f"synthetic, {len(synthetic)} scenes", f"{fractions.mean():.3f}",
      f"{fractions.min():.3f}", f"{fractions.max():.3f}",
      _rgb(colours.mean(axis=0))))
  return "\n".join(lines)


def _figure(synthetic: Sequence[np.ndarray], real: Sequence[np.ndarray],
            out: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = (len(real) + 1) // 2
  fig, axes = plt.subplots(rows, 4, figsize=(12.8, 2.65 * rows + 0.7),
                           gridspec_kw={"wspace": 0.03, "hspace": 0.15,
                                        "top": 1 - 0.7 / (2.65 * rows + 0.7),
                                        "bottom": 0.0, "left": 0.0,
                                        "right": 1.0})
  for row in range(rows):
    for col in range(4):
      index = 2 * row + col % 2
      images, name = ((synthetic, "synthetic, seed") if col < 2
                      else (real, "real CLEVR, img"))
      ax = axes[row, col]
      ax.axis("off")
      if index < len(images):
        ax.imshow(images[index])
        ax.set_title(f"{name} {index if col < 2 else index + 1}", fontsize=9)
  fig.suptitle(f"Synthetic scenes (renderer v{renderer.RENDERER_VERSION}, left) "
               "beside real CLEVR renders (right)", fontsize=12)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100, bbox_inches="tight")
  plt.close(fig)


def scene_config(text: str) -> renderer.SceneConfig:
  """'field=value,...' -> a SceneConfig with those number or switch fields changed."""
  fields = {f.name: f for f in dataclasses.fields(renderer.SceneConfig)}
  changes = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    name = name.strip()
    default = getattr(renderer.SceneConfig, name, None) if name in fields else None
    if not value or type(default) not in (int, float, bool):
      scalars = sorted(n for n in fields
                       if type(getattr(renderer.SceneConfig, n, None)) in (int, float, bool))
      raise ValueError(f"--scene: {part!r} is not FIELD=VALUE for a number or switch "
                       f"field of renderer.SceneConfig ({', '.join(scalars)})")
    try:
      changes[name] = (value.strip().lower() in ("1", "true") if type(default) is bool
                       else type(default)(value))
    except ValueError as e:
      raise ValueError(f"--scene: {part!r}: {e}") from e
  return renderer.SceneConfig(**changes)


def define_flags() -> None:
  """The command line (defined when run, not on import: the tests import this module)."""
  flags.DEFINE_string("out", "docs/synthetic_vs_real.png", "Where to write the figure (PNG).")
  flags.DEFINE_string(
      "renders_dir", None, "A folder of real CLEVR renders (img*.png, 240x320).")
  flags.DEFINE_string(
      "samples_dir", str(_REPO_ROOT / "tests" / "data" / "clevr_with_masks_samples"),
      "A folder of real clevr_with_masks samples (sample_*.npz).")
  flags.DEFINE_integer(
      "num_scenes", 200, "Synthetic scenes (seeds 0..n-1) behind the statistics.")
  flags.DEFINE_list(
      "records", [], "Official-format GZIP TFRecords whose scene statistics join the table.")
  flags.DEFINE_integer("max_records", 0, "Scenes read per file (0: all).")
  flags.DEFINE_integer("processes", None, "Render workers; default one per CPU.")
  flags.DEFINE_string("scene", "", "FIELD=VALUE,...: renderer.SceneConfig settings of the "
                      "synthetic scenes (default: the renderer's).")


def main(argv: Sequence[str]) -> None:
  del argv
  if not flags.FLAGS.renders_dir and not flags.FLAGS.records:
    sys.exit("error: give --renders_dir (a folder of real CLEVR renders, img*.png, "
             "240x320, which the repository does not ship) for the figure, or "
             "--records (official-format TFRecords) for the statistics")
  try:
    real_renders = (load_real_renders(flags.FLAGS.renders_dir)
                    if flags.FLAGS.renders_dir else [])
    real_samples = load_real_samples(flags.FLAGS.samples_dir)
    for path in flags.FLAGS.records:
      if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"--records: no file {path}")
    config = scene_config(flags.FLAGS.scene)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  count = max(flags.FLAGS.num_scenes, _SHOWN)
  scenes = renderer.render_scenes(range(count), config, processes=flags.FLAGS.processes)
  shown, synthetic_stats, synthetic_scene_stats = [], [], []
  for scene in scenes:
    if len(shown) < _SHOWN:
      shown.append(scene["image"])
    synthetic_stats.append(background_stats(scene["image"], scene["labels"] == 0))
    synthetic_scene_stats.append(scene_stats(scene["image"], scene["labels"]))
  real_stats = [background_stats(image, background)
                for image, background in real_samples]
  print(_table(real_stats, synthetic_stats))
  if flags.FLAGS.records:
    name = f"synthetic v{renderer.RENDERER_VERSION}" + (
        f", {flags.FLAGS.scene}" if flags.FLAGS.scene else "")
    columns = {name: synthetic_scene_stats}
    for path in flags.FLAGS.records:
      columns[pathlib.Path(path).stem] = record_stats(path, flags.FLAGS.max_records)
    sample_paths = sorted(pathlib.Path(flags.FLAGS.samples_dir).glob("sample_*.npz"))
    columns["real clevr_with_masks"] = [
        scene_stats(image, schema.masks_to_labels(np.load(p)["mask"]))
        for p, (image, _) in zip(sample_paths, real_samples)]
    print(stats_table(columns))
  if real_renders:
    out = pathlib.Path(flags.FLAGS.out)
    _figure(shown, real_renders[:_SHOWN], out)
    print(f"figure: {out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
