"""Figures written into a workdir. matplotlib with the Agg backend: no display."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from clevr_jax import metrics
from clevr_jax import schema

def _pyplot() -> Any:
  """matplotlib.pyplot on the Agg backend, imported on first use: training
  starts without it (about 1 s of imports before the first step)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# Background black, then the three shapes, as distinct colours.
CLASS_COLORS = np.array([[0, 0, 0], [230, 90, 60], [70, 160, 230], [250, 210, 60]],
                        np.uint8)


def label_colors(num_labels: int) -> np.ndarray:
  """A fixed palette of `num_labels` distinct colours, uint8 [n, 3]; label 0 black."""
  plt = _pyplot()
  distinct = np.concatenate([plt.get_cmap(name).colors for name in
                             ("tab10", "Set2", "Dark2", "tab20b")])[:, :3]
  colors = np.concatenate([[[0, 0, 0]], distinct[np.arange(num_labels - 1) % len(distinct)]])
  return (255 * colors).astype(np.uint8)


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
  plt = _pyplot()
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
    from matplotlib import patches  # pylint: disable=g-import-not-at-top
    handles = [patches.Patch(color=CLASS_COLORS[c] / 255, label=name)
               for c, name in enumerate(schema.SEMANTIC_CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _match_colors(true_labels: np.ndarray, pred_labels: np.ndarray, num_pred: int
                  ) -> np.ndarray:
  """Maps each predicted cluster to the true slot it overlaps best (Hungarian on IoU),
  so matched masks share a colour across panels; unmatched clusters get new ones."""
  from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top
  t = int(true_labels.max()) + 1
  rows, cols = linear_sum_assignment(_iou(true_labels, pred_labels, t, num_pred), maximize=True)
  mapping = np.arange(num_pred) + t  # unmatched clusters: colours after the true slots
  mapping[cols] = rows
  return mapping[pred_labels]


def _iou(true_labels: np.ndarray, pred_labels: np.ndarray, t: int, p: int) -> np.ndarray:
  """The IoU matrix [t, p] of one image, from metrics (IoU is computed in one place)."""
  table = metrics.contingency_host(true_labels[None], pred_labels[None], t, p)
  return np.asarray(metrics.iou_from_contingency(table))[0]


def tap_mean_iou_chart(path: str, series: dict[str, dict[str, float]], taps: list[str],
                       title: str, poster: dict[str, float] | None = None,
                       ylabel: str = "mean IoU (Hungarian)") -> None:
  """The poster's chart: one line per model, mean IoU against the tap."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 3.6))
  x = np.arange(len(taps))
  for label, values in series.items():
    ax.plot(x, [values.get(t, np.nan) for t in taps], marker="o", label=label)
  if poster:
    px = [i for i, t in enumerate(taps) if t in poster]
    ax.scatter(px, [poster[taps[i]] for i in px], marker="*", s=120, color="k",
               label="poster", zorder=5)
  ax.set_xticks(x, taps, rotation=30, fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def pca_colors(features: np.ndarray) -> np.ndarray:
  """[h, w, c] features -> [h, w, 3] in [0, 1]: the first three principal components."""
  h, w, c = features.shape
  x = features.reshape(-1, c).astype(np.float64)
  x = x - x.mean(0)
  if c > 1:
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    x = x @ vt[:3].T
  x = np.pad(x, ((0, 0), (0, max(0, 3 - x.shape[1]))))
  lo, hi = np.percentile(x, 1, axis=0), np.percentile(x, 99, axis=0)
  return np.clip((x - lo) / np.maximum(hi - lo, 1e-8), 0, 1).reshape(h, w, 3)


def _best(table: dict) -> tuple[str, str]:
  """(segmenter, tap) of the highest poster mIoU."""
  pairs = [(row["poster_miou"], seg, tap) for seg, by_tap in table.items()
           for tap, row in by_tap.items() if row.get("poster_miou") == row.get("poster_miou")]
  _, seg, tap = max(pairs) if pairs else (0, next(iter(table)), next(iter(next(iter(table.values())))))
  return seg, tap


def save_tap_figures(workdir: str, table: dict, first: dict, taps: tuple[str, ...]) -> None:
  """Per-tap charts (one line per segmenter), the best segmenter's masks of a few
  images, one IoU matrix, and PCA of each tap.

  Args:
    table: {segmenter: {tap: {metric: mean}}}.
    first: figures of `evaluation.protocol.score_features` (without "features":
      the charts and masks only).
    taps: the feature maps, in order.
  """
  plt = _pyplot()
  for metric, name, label in (("poster_miou", "miou_per_tap.png", "poster mIoU"),
                              ("fg_ari", "fg_ari_per_tap.png", "FG-ARI")):
    series = {seg: {t: by_tap[t][metric] for t in taps if t in by_tap}
              for seg, by_tap in table.items()}
    tap_mean_iou_chart(os.path.join(workdir, name), series, list(taps),
                       f"{label} of each tap, one line per segmenter", ylabel=label)
  if not first:
    return
  best_seg, best_tap = _best(table)
  images, truth = first["image"], first["instance_labels"]
  palette = label_colors(32)
  n = len(images)
  fig, axes = plt.subplots(n, len(taps) + 2, figsize=(1.6 * (len(taps) + 2), 1.3 * n + 0.4),
                           squeeze=False)
  for i in range(n):
    show_image(axes[i, 0], images[i], "image" if i == 0 else "")
    show_image(axes[i, 1], colorize(truth[i], palette) / 255, "true masks" if i == 0 else "")
    for j, tap in enumerate(taps):
      # The best segmenter, or the first that scores this tap (some score a few).
      seg = best_seg if tap in first["labels"][best_seg] else next(
          s for s, by_tap in first["labels"].items() if tap in by_tap)
      labels = first["labels"][seg][tap][i]
      pred = _match_colors(truth[i], labels, int(labels.max()) + 1)
      score = first["scores"][seg][tap].poster_miou[i]
      show_image(axes[i, j + 2], colorize(pred, palette) / 255, f"{tap} {score:.2f}")
  fig.suptitle(f"segmenter {best_seg}", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "masks.png"), dpi=90)
  plt.close(fig)

  # IoU matrix of the first image, best segmenter and tap.
  t_labels, p_labels = truth[0], first["labels"][best_seg][best_tap][0]
  t, p = int(first["num_masks"][0]), int(p_labels.max()) + 1
  iou = _iou(np.minimum(t_labels, t - 1), p_labels, t, p)
  fig, ax = plt.subplots(figsize=(0.5 * p + 2, 0.45 * t + 1.5))
  im = ax.imshow(iou, cmap="viridis", vmin=0, vmax=1)
  for (r, c), v in np.ndenumerate(iou):
    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
            color="w" if v < 0.5 else "k")
  ax.set_xlabel("predicted region")
  ax.set_ylabel("true mask (0 = background)")
  ax.set_title(f"IoU, {best_seg} on {best_tap}, first test image", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "iou_matrix.png"), dpi=100)
  plt.close(fig)

  if "features" not in first:  # label maps only (scored masks)
    return
  # What each tap sees: its channels projected to three by PCA, as colour.
  fig, axes = plt.subplots(1, len(taps), figsize=(1.8 * len(taps), 1.8), squeeze=False)
  for j, tap in enumerate(taps):
    feats = first["features"][tap][0]
    show_image(axes[0, j], pca_colors(feats), f"{tap} {feats.shape[0]}x{feats.shape[1]}x{feats.shape[2]}")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "tap_pca.png"), dpi=100)
  plt.close(fig)


def save_supervised_figures(workdir: str, scores: dict, first: dict) -> None:
  plt = _pyplot()
  confusion = np.asarray(scores["confusion"], np.float64)
  rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(4.2, 3.6))
  im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  for (r, c), v in np.ndenumerate(rates):
    ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7,
            color="w" if v > 0.5 else "k")
  ticks = range(schema.NUM_SEMANTIC_CLASSES)
  ax.set_xticks(ticks, schema.SEMANTIC_CLASSES, fontsize=7)
  ax.set_yticks(ticks, schema.SEMANTIC_CLASSES, fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title("Confusion (row-normalised)", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "confusion_matrix.png"), dpi=100)
  plt.close(fig)
  if first:
    one_hot = np.eye(schema.NUM_SEMANTIC_CLASSES)[first["pred"]]
    save_preview(os.path.join(workdir, "predictions.png"), first["image"], one_hot,
                 "segmentation", first["semantic"])
