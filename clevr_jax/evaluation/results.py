"""The one writer of results: results.json, and results.md with one table per segmenter."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging

from clevr_jax import metrics
from clevr_jax import schema
from clevr_jax.segmentation import segmenters as segmenters_lib

K_ERROR = "k_error"  # mean |predicted K - true K|, for segmenters that predict K


def spec_dict(segmenter: segmenters_lib.Segmenter) -> dict[str, Any]:
  spec = dataclasses.asdict(segmenter)
  for key in ("pixel_transforms", "tap_transforms"):
    spec[key] = ",".join(spec[key])
  return spec


def _describe(spec: dict[str, Any] | None) -> str:
  if not spec:
    return ""
  if spec.get("cluster") == "argmax":
    return ("each pixel's largest channel (argmax over the slots; no K-Means, no oracle K)"
            + (f"; taps: {', '.join(spec['taps'])}" if spec.get("taps") else ""))
  parts = [f"K-Means {spec['metric']}, K {spec['k']}"]
  if spec["num_clusters"]:
    parts.append(f"{spec['num_clusters']} clusters")
  if spec["pixel_transforms"]:
    parts.append(f"pixels: {spec['pixel_transforms']}")
  if spec["tap_transforms"]:
    parts.append(f"taps: {spec['tap_transforms']}")
  if spec.get("split_source", "tap") != "tap" or spec.get("merge_source", "tap") != "tap":
    parts.append(f"regions from {spec['split_source'].replace('_', ' ')}, merged by "
                 f"{spec['merge_source'].replace('_', ' ')} means")
  if spec["modal_size"] > 1:
    parts.append(f"modal filter {spec['modal_size']}")
  if spec["split"]:
    parts.append("split into 4-connected components")
  if spec["min_area"]:
    parts.append(f"absorb regions < {spec['min_area']:g} of the image")
  if spec.get("refine_steps", 0):
    rounds = spec["refine_steps"]
    parts.append(f"refine boundaries ({rounds} round{'s' if rounds > 1 else ''})")
  if spec["merge"]:
    if spec["k"] != "predict":
      parts.append("merge to K")
    elif spec.get("tap_merge_threshold", 0) > 0:
      colour = ""
      if spec.get("merge_source") == "tap_or_pixels":
        colour = (f", or colour < "
                  f"{spec.get('colour_merge_threshold') or spec['merge_threshold']:g}")
      parts.append(f"merge while distance < {spec['merge_threshold']:g} "
                   f"(taps: {spec['tap_merge_threshold']:g}{colour})")
    else:
      parts.append(f"merge while distance < {spec['merge_threshold']:g}")
    if spec.get("border_merge_factor", 1.0) != 1.0:
      parts.append(f"the border's regions {spec['border_merge_factor']:g}x farther from "
                   "the others")
  return "; ".join(parts)


def results_markdown(results: dict[str, Any]) -> str:
  lines = [f"# {results['name']}", ""]
  if "checkpoint_step" in results:
    lines.append(f"Checkpoint step {results['checkpoint_step']}, "
                 f"{results['num_images']} test images.")
  else:
    lines.append(f"{results['num_images']} test images.")
  if "supervised" in results:
    sup = results["supervised"]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sup.items() if k != "confusion"]
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
              "| | " + " | ".join(schema.SEMANTIC_CLASSES) + " |",
              "|---" * (schema.NUM_SEMANTIC_CLASSES + 1) + "|"]
    for name, row in zip(schema.SEMANTIC_CLASSES, sup["confusion"]):
      lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |")
  specs = results.get("segmenter_specs", {})
  for name, by_tap in results.get("segmenters", {}).items():
    columns = list(metrics.INSTANCE_METRICS)
    if any(K_ERROR in row for row in by_tap.values()):
      columns.append(K_ERROR)
    lines += ["", f"## segmenter `{name}`", "", _describe(specs.get(name)), "",
              "| tap | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for tap, row in by_tap.items():
      lines.append(f"| {tap} | " + " | ".join(
          f"{row.get(m, math.nan):.4f}" for m in columns) + " |")
  if "masks" in results:
    columns = list(metrics.INSTANCE_METRICS) + [K_ERROR]
    lines += ["", "## predicted masks (no clustering)", "",
              "| masks | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results["masks"].items():
      lines.append(f"| {name} | " + " | ".join(f"{row.get(m, math.nan):.4f}" for m in columns)
                   + " |")
  if "random_masks" in results:
    columns = list(metrics.INSTANCE_METRICS)
    lines += ["", "## random masks (i.i.d. uniform labels)", "",
              "| K | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for k, row in results["random_masks"].items():
      lines.append(f"| {k} | " + " | ".join(f"{row.get(m, math.nan):.4f}" for m in columns)
                   + " |")
  return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict[str, Any], stem: str = "results") -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"{stem}.json"), "w", encoding="utf-8") as f:
    # NaN as null: strict JSON readers reject NaN.
    json.dump(_nan_to_none(results), f, indent=1, default=float)
  markdown = results_markdown(results)
  with open(os.path.join(workdir, f"{stem}.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  logging.info("Wrote %s/%s.json and %s.md\n%s", workdir, stem, stem, markdown)


def _nan_to_none(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_nan_to_none(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x
