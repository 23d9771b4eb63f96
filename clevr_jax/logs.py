"""Where a run's numbers go: the log, TensorBoard event files and metrics.jsonl.

Only process 0 writes; the others get a writer that does nothing, so callers
need no `if process_index() == 0` of their own.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging


class MetricWriter:
  """Scalars to TensorBoard (`<workdir>/tensorboard`) and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._summary = None
    if not enabled:
      return
    import tensorflow as tf  # only the writer of event files needs it
    os.makedirs(workdir, exist_ok=True)
    self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    import tensorflow as tf
    with self._summary.as_default(step=step):
      for name, value in metrics.items():
        tf.summary.scalar(name, value)
    self._summary.flush()
    record = {"step": step, "time": time.time()} | {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._summary.close()
      self._jsonl.close()


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
