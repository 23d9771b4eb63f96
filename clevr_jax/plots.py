"""Figures written into a workdir. matplotlib with the Agg backend: no display."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from clevr_jax.data import schema

# Background black, then the three shapes, as distinct colours.
CLASS_COLORS = np.array([[0, 0, 0], [230, 90, 60], [70, 160, 230], [250, 210, 60]],
                        np.uint8)


def label_colors(num_labels: int) -> np.ndarray:
  """A fixed palette of `num_labels` distinct colours, uint8 [n, 3]; label 0 black."""
  cmap = plt.get_cmap("tab20", max(num_labels - 1, 1))
  colors = [(0, 0, 0)] + [tuple(int(255 * c) for c in cmap(i)[:3])
                          for i in range(num_labels - 1)]
  return np.array(colors, np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  return palette[np.clip(labels, 0, len(palette) - 1)]


def show_image(ax, image: np.ndarray, title: str = "") -> None:
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 1:
    ax.imshow(np.clip(image[..., 0], 0, 1), cmap="gray", vmin=0, vmax=1)
  else:
    ax.imshow(np.clip(image, 0, 1))
  ax.set_title(title, fontsize=8)
  ax.axis("off")


def save_preview(path: str, images: np.ndarray, outputs: np.ndarray, task: str,
                 semantic: np.ndarray | None = None) -> None:
  """A few inputs beside their reconstructions (or true and predicted class maps)."""
  n = len(images)
  cols = 3 if task == "segmentation" else 2
  fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 1.9 * n), squeeze=False)
  for i in range(n):
    show_image(axes[i, 0], images[i], "input" if i == 0 else "")
    if task == "segmentation":
      show_image(axes[i, 1], colorize(semantic[i], CLASS_COLORS) / 255,
                 "true classes" if i == 0 else "")
      show_image(axes[i, 2], colorize(outputs[i].argmax(-1), CLASS_COLORS) / 255,
                 "predicted" if i == 0 else "")
    else:
      show_image(axes[i, 1], outputs[i], "reconstruction" if i == 0 else "")
  if task == "segmentation":
    handles = [matplotlib.patches.Patch(color=CLASS_COLORS[c] / 255, label=name)
               for c, name in enumerate(schema.SEMANTIC_CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
