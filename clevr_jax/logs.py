"""Where a run's numbers go: the log, TensorBoard event files and metrics.jsonl.

Only process 0 writes; the others get a writer that does nothing, so callers
need no `if process_index() == 0` of their own.

TensorFlow (tf.summary, for the event files) is imported only when a writer is
made, so this module belongs to the TensorFlow-free core; where TensorFlow is
absent, the writer keeps metrics.jsonl and says that it skips TensorBoard.
metrics.jsonl is strict JSON: a value that is not finite is written as null.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging

METRICS_FILE = "metrics.jsonl"


class Progress:
  """Logs images done, images/s and the time left, at most every `every_s` seconds."""

  def __init__(self, what: str, total: int, every_s: float = 10.0) -> None:
    self.what, self.total, self.every_s = what, total, every_s
    self.done = 0
    self.start = self.last = time.perf_counter()

  def update(self, images: int) -> None:
    self.done += images
    now = time.perf_counter()
    if now - self.last < self.every_s and self.done < self.total:
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    left = (self.total - self.done) / rate if rate > 0 else float("nan")
    logging.info("%s: %d/%d images, %.1f images/s, %.0f s left", self.what,
                 min(self.done, self.total), self.total, rate, max(left, 0.0))


class MetricWriter:
  """Scalars to TensorBoard (`<workdir>/tensorboard`) and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._summary = None
    self._tf = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning("TensorFlow is not installed: no TensorBoard event files, "
                      "only %s", METRICS_FILE)
    else:
      self._tf = tf
      self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    if self._summary is not None:
      with self._summary.as_default(step=step):
        for name, value in metrics.items():
          self._tf.summary.scalar(name, value)
      self._summary.flush()
    record = {"step": step, "time": time.time()} | {
        k: float(v) if math.isfinite(float(v)) else None for k, v in metrics.items()}
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      if self._summary is not None:
        self._summary.close()
      self._jsonl.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` ([] if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def drop_records_after(workdir: str, step: int) -> int:
  """Removes the records of steps after `step` (logged after the checkpoint a run
  resumes from, they will be logged again); returns how many were removed."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by a kill: drop it
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return len(lines) - len(kept)


class Throughput:
  """Images per second and time left, measured between log points."""

  def __init__(self, images_per_step: int, total_steps: int, start_step: int):
    self.images_per_step = images_per_step
    self.total_steps = total_steps
    self._step = start_step
    self._time = time.perf_counter()

  def update(self, step: int) -> tuple[float, float]:
    """(images/s, seconds left) since the previous call."""
    now = time.perf_counter()
    seconds_per_step = (now - self._time) / max(step - self._step, 1)
    self._step, self._time = step, now
    left = (self.total_steps - step) * seconds_per_step
    return self.images_per_step / seconds_per_step, left


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
