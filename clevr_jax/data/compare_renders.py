"""Synthetic scenes beside real CLEVR renders: a figure and a table of numbers.

  python -m clevr_jax.data.compare_renders --out docs/synthetic_vs_real.png

The figure puts 8 synthetic scenes (seeds 0-7) beside the 8 real renders of
`shared/data/clevr_renders`. The table compares the background-pixel fraction
and the mean background colour of the two real `clevr_with_masks` samples with
those of `--num_scenes` synthetic scenes.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from clevr_jax.data import renderer

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

_OUT = flags.DEFINE_string("out", "docs/synthetic_vs_real.png",
                           "Where to write the figure (PNG).")
_SHARED_DIR = flags.DEFINE_string(
    "shared_dir", str(_REPO_ROOT.parent / "shared"),
    "The shared folder holding data/clevr_renders and "
    "data/clevr_with_masks_samples.")
_NUM_SCENES = flags.DEFINE_integer(
    "num_scenes", 200, "Synthetic scenes (seeds 0..n-1) behind the statistics.")
_PROCESSES = flags.DEFINE_integer(
    "processes", None, "Render workers; default one per CPU.")

_SHOWN = 8  # scenes per side of the figure


def _data_dir(shared_dir: str, name: str) -> pathlib.Path:
  path = pathlib.Path(shared_dir) / "data" / name
  if not path.is_dir():
    raise FileNotFoundError(
        f"{path} is missing: point --shared_dir at the shared folder that "
        f"holds data/{name} (default: ../shared next to the repository).")
  return path


def load_real_renders(shared_dir: str) -> list[np.ndarray]:
  """The real CLEVR renders as RGB uint8 [240, 320, 3] (alpha dropped)."""
  folder = _data_dir(shared_dir, "clevr_renders")
  paths = sorted(folder.glob("img*.png"),
                 key=lambda p: int(p.stem.removeprefix("img")))
  if not paths:
    raise FileNotFoundError(f"no img*.png in {folder}")
  return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def load_real_samples(shared_dir: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """The real clevr_with_masks samples as (image [H, W, 3], background [H, W])."""
  folder = _data_dir(shared_dir, "clevr_with_masks_samples")
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
  real_renders = load_real_renders(_SHARED_DIR.value)
  real_samples = load_real_samples(_SHARED_DIR.value)
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
