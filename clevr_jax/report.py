"""Merges several runs' results into one table and the poster's per-tap chart.

python -m clevr_jax.main --mode=report --config=configs/unet_rgb.py \
    --workdirs=runs/unet_rgb,runs/ae_rgb,runs/unet_gray,runs/ae_gray,runs/baselines
"""

from __future__ import annotations

import json
import os
from typing import Any

from clevr_jax import plots

# The poster's figures (shared DESIGN.md): its per-tap mean IoU where it states
# one, as (low, high) ranges where it gives ranges.
POSTER = {
    "rgb": {"input": (0.55, 0.55), "output": (0.43, 0.43), "inner taps": (0.08, 0.23)},
    "gray": {"all taps": (0.10, 0.16)},
    "random masks": (0.04, 0.04),
    "supervised": (0.9828, 0.9828),
}
POSTER_RGB_POINTS = {"input": 0.55, "output": 0.43}


def load_results(workdir: str) -> list[dict[str, Any]]:
  found = []
  for stem in ("results", "baselines"):
    path = os.path.join(workdir, f"{stem}.json")
    if os.path.exists(path):
      again = (f"run --mode={'evaluate' if stem == 'results' else stem} in {workdir} again "
               "to rewrite it")
      with open(path, encoding="utf-8") as f:
        try:
          result = json.load(f)
        except json.JSONDecodeError as e:  # a run killed while writing it, or edited
          raise ValueError(f"{path} is not valid JSON ({e}): it was cut short or edited; "
                           f"{again}") from None
      if not isinstance(result, dict) or not isinstance(result.get("name"), str):
        raise ValueError(f"{path} is JSON but not a run's results (an object with its "
                         f"'name' and scores; this one is a {type(result).__name__}): {again}")
      found.append(result)
  if not found:
    raise FileNotFoundError(
        f"no results.json or baselines.json in {workdir!r}: run --mode=evaluate "
        "(or --mode=baselines) there first")
  return found


def run_labels(runs: list[dict[str, Any]]) -> list[str]:
  """Each run's name in the table and chart: its config name, with its workdir
  where several runs share the name (a run and its self-training rounds, two
  seeds), so that no two rows or chart lines of different runs look alike."""
  names = [r["name"] for r in runs]
  return [f"{r['name']} ({os.path.normpath(r['workdir'])})" if names.count(r["name"]) > 1
          else r["name"] for r in runs]


def poster_reference(name: str, segmenter: str, tap: str) -> str:
  """The poster's figure for a row, where it has one (its protocol: segmenter 'kmeans')."""
  if segmenter == "random masks":
    return "0.04"
  if segmenter != "kmeans":
    return ""
  if name == "baselines":
    return "0.55" if tap == "pixels" else ""
  if "gray" in name:
    return "0.10-0.16"
  if name.endswith("_rgb") or name in ("unet", "ae"):
    if tap in POSTER_RGB_POINTS:
      return f"{POSTER_RGB_POINTS[tap]:.2f}"
    return "0.08-0.23"
  return ""


def _fmt(value: Any) -> str:
  return "" if value is None else f"{value:.4f}"


def write_report(workdirs: list[str], output_dir: str, metric: str = "poster_miou",
                 segmenter: str = "kmeans") -> str:
  """Writes report.md, report.json and report_miou_per_tap.png; returns the markdown.

  The table has every run x segmenter x tap; the chart one line per run for
  `segmenter` (the poster's K-Means by default). Runs are named by their config
  name, and by their workdir too where names repeat (`run_labels`).
  """
  runs = [dict(r, workdir=w) for w in workdirs for r in load_results(w)]
  labels = run_labels(runs)
  os.makedirs(output_dir, exist_ok=True)
  lines = ["# Segmentation as clusterization: merged results", "",
           f"Metric: `{metric}`. The poster's column gives its figures (the poster's "
           "protocol: segmenter `kmeans`, oracle K) for comparison.", "",
           "| run | segmenter | tap | " + metric + " | fg_ari | mbo | poster |",
           "|---|---|---|---|---|---|---|"]
  series: dict[str, dict[str, float]] = {}
  taps_in_order: list[str] = []
  for run, label in zip(runs, labels):
    if "supervised" in run:
      sup = run["supervised"]
      lines.append(f"| {label} | (supervised) | | {_fmt(sup['class_hungarian_miou'])} | "
                   f"| | 0.9828 |")
      lines.append(f"| {label} | pixel accuracy | | {_fmt(sup['pixel_accuracy'])} | | | |")
      continue
    for seg, by_tap in run.get("segmenters", {}).items():
      for tap, row in by_tap.items():
        lines.append(f"| {label} | {seg} | {tap} | {_fmt(row.get(metric))} | "
                     f"{_fmt(row.get('fg_ari'))} | {_fmt(row.get('mbo'))} | "
                     f"{poster_reference(run['name'], seg, tap)} |")
        if run["name"] != "baselines" and seg == segmenter:
          series.setdefault(label, {})[tap] = row.get(metric)
          if tap not in taps_in_order:
            taps_in_order.append(tap)
    for k, row in run.get("random_masks", {}).items():
      lines.append(f"| {label} | random masks | K {k} | {_fmt(row.get(metric))} | "
                   f"{_fmt(row.get('fg_ari'))} | {_fmt(row.get('mbo'))} | "
                   f"{poster_reference(run['name'], 'random masks', '') if k == 'oracle' else ''} |")
  markdown = "\n".join(lines) + "\n"
  with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump({"runs": runs, "poster": POSTER}, f, indent=1, default=float)
  if series:
    plots.tap_mean_iou_chart(os.path.join(output_dir, "report_miou_per_tap.png"), series,
                             taps_in_order, f"{metric} per tap (segmenter {segmenter})",
                             poster=POSTER_RGB_POINTS)
  print(markdown)
  return markdown
