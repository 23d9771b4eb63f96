r"""Seconds from the training command to its first steps.

  python -m clevr_jax.benchmarks.startup_benchmark [-- --config=configs/unet_rgb.py:quick ...]

Starts `python -m clevr_jax.main --mode=train` (default: the quick preset,
with `--config.log_every_steps=1` and a fresh temporary workdir; arguments after
`--` replace the config and add overrides), reads its log, and stops it after
the second step's line. Prints when JAX started, when "Training ..." was logged
(data, state and steps built) and when steps 1 and 2 were logged, from the
command's start. Build the dataset first (`--mode=prepare`): its rendering is
not start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def first_steps(args: list[str]) -> dict[str, float]:
  workdir = tempfile.mkdtemp(prefix="startup_benchmark_")
  config = [a for a in args if a.startswith("--config=")] or [
      "--config=configs/unet_rgb.py:quick"]
  # The config file before its overrides.
  command = [sys.executable, "-m", "clevr_jax.main", "--mode=train", *config,
             "--config.log_every_steps=1", f"--workdir={workdir}",
             *[a for a in args if not a.startswith("--config=")]]
  start = time.perf_counter()
  process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True)
  marks: dict[str, float] = {}
  patterns = {"jax": " process(es), ", "training": "] Training ", "step 1": " step 1/",
              "step 2": " step 2/"}
  try:
    for line in process.stderr:
      for name, pattern in patterns.items():
        if name not in marks and pattern in line:
          marks[name] = time.perf_counter() - start
      if "step 2" in marks or line.startswith("error:"):
        break
  finally:
    process.kill()
    process.wait()
  return marks


def main() -> None:
  args = sys.argv[1:]
  if args and args[0] == "--":
    args = args[1:]
  marks = first_steps(args)
  print("  ".join(f"{k} {v:.1f} s" for k, v in marks.items()),
        f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  main()
