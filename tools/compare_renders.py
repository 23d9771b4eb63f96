"""Synthetic scenes beside real CLEVR renders: a figure and a table of numbers.

  python -m tools.compare_renders --renders_dir=DIR --out docs/synthetic_vs_real.png

The figure puts 8 synthetic scenes (seeds 0-7) beside real CLEVR renders
(`--renders_dir`: a folder of img*.png, 240x320; the repository does not ship
them). The table compares the background-pixel fraction and the mean
background colour of the two real `clevr_with_masks` samples (by default the
ones in tests/data) with those of `--num_scenes` synthetic scenes.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from clevr_jax.data import renderer

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_OUT = flags.DEFINE_string("out", "docs/synthetic_vs_real.png",
                           "Where to write the figure (PNG).")
_RENDERS_DIR = flags.DEFINE_string(
    "renders_dir", None, "A folder of real CLEVR renders (img*.png, 240x320).")
_SAMPLES_DIR = flags.DEFINE_string(
    "samples_dir", str(_REPO_ROOT / "tests" / "data" / "clevr_with_masks_samples"),
    "A folder of real clevr_with_masks samples (sample_*.npz).")
_NUM_SCENES = flags.DEFINE_integer(
    "num_scenes", 200, "Synthetic scenes (seeds 0..n-1) behind the statistics.")
_PROCESSES = flags.DEFINE_integer(
    "processes", None, "Render workers; default one per CPU.")

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


def main(argv: Sequence[str]) -> None:
  del argv
  if not _RENDERS_DIR.value:
    sys.exit("error: --renders_dir is required: a folder of real CLEVR renders "
             "(img*.png, 240x320), which the repository does not ship")
  try:
    real_renders = load_real_renders(_RENDERS_DIR.value)
    real_samples = load_real_samples(_SAMPLES_DIR.value)
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  count = max(_NUM_SCENES.value, _SHOWN)
  scenes = renderer.render_scenes(range(count), processes=_PROCESSES.value)
  shown, synthetic_stats = [], []
  for scene in scenes:
    if len(shown) < _SHOWN:
      shown.append(scene["image"])
    synthetic_stats.append(background_stats(scene["image"], scene["labels"] == 0))
  real_stats = [background_stats(image, background)
                for image, background in real_samples]
  out = pathlib.Path(_OUT.value)
  _figure(shown, real_renders[:_SHOWN], out)
  print(_table(real_stats, synthetic_stats))
  print(f"figure: {out}")


if __name__ == "__main__":
  app.run(main)
