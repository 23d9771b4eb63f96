r"""Seconds from the training command to its first steps, cold and warm.

  python -m clevr_jax.benchmarks.startup_benchmark [--runs=2] \
      [-- --config=configs/unet_rgb.py:quick --config.data.data_dir=DIR ...]

Starts `python -m clevr_jax.main --mode=train` `--runs` times, one after the
other (default: the quick preset, with `--config.log_every_steps=1` and a
fresh temporary workdir each time; arguments after `--` replace the config and
add overrides), reads its log, and stops it after the second step's line.
JAX's persistent compilation cache is a fresh empty directory shared by the
runs, so the first run is cold (it compiles and fills the cache) and the
others warm (they load the compiled programs), unless JAX_COMPILATION_CACHE_DIR
is set (then every run uses that cache as it is).

Prints, per run, the seconds from the command's start until JAX was started
(imports included: main.py imports TensorFlow first for the data modes), until
"Training ..." was logged (data, state and steps built, nothing compiled yet),
and until steps 1 and 2 were logged (step 1's line is the first step done:
its loss is read back), with the load average, and the CPU time the command
had used by then (all its threads; on this shared 2-core host the wall time
follows the load, the CPU time much less). Build the dataset first
(`--mode=prepare`): its rendering is not start-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

MARKS = {"jax": " process(es), ", "training": "] Training ", "step 1": " step 1/",
         "step 2": " step 2/"}


def cpu_seconds(pid: int) -> float | None:
  """CPU time (user + system, all threads) the process has used so far (Linux)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_steps(args: list[str], env: dict[str, str] | None = None
                ) -> dict[str, tuple[float, float | None]]:
  """(seconds from the command's start, CPU seconds the command had used) at
  each of MARKS' log lines (those seen)."""
  workdir = tempfile.mkdtemp(prefix="startup_benchmark_")
  config = [a for a in args if a.startswith("--config=")] or [
      "--config=configs/unet_rgb.py:quick"]
  # The config file before its overrides.
  command = [sys.executable, "-m", "clevr_jax.main", "--mode=train", *config,
             "--config.log_every_steps=1", f"--workdir={workdir}",
             *[a for a in args if not a.startswith("--config=")]]
  start = time.perf_counter()
  process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True, env=env)
  marks: dict[str, tuple[float, float | None]] = {}
  errors = []
  try:
    for line in process.stderr:
      for name, pattern in MARKS.items():
        if name not in marks and pattern in line:
          marks[name] = (time.perf_counter() - start, cpu_seconds(process.pid))
      if line.startswith("error:"):
        errors.append(line.strip())
      if "step 2" in marks or errors:
        break
  finally:
    process.kill()
    process.wait()
    shutil.rmtree(workdir, ignore_errors=True)
  if errors:
    raise SystemExit(f"the training command failed: {errors[0]}")
  return marks


def main() -> None:
  args = sys.argv[1:]
  runs = 2
  while args and args[0].startswith("--runs="):
    runs = int(args.pop(0).split("=", 1)[1])
  if args and args[0] == "--":
    args = args[1:]
  env = dict(os.environ)
  own_cache = "JAX_COMPILATION_CACHE_DIR" not in env
  if own_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="startup_benchmark_jax_")
  try:
    for run in range(runs):
      load = os.getloadavg()[0]
      marks = first_steps(args, env)
      kind = ("cold" if run == 0 else "warm") if own_cache else "given cache"
      print(f"run {run + 1} ({kind}):", "  ".join(
          f"{k} {wall:.1f} s" + (f" (CPU {cpu:.1f} s)" if cpu is not None else "")
          for k, (wall, cpu) in marks.items()),
            f"(load average {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
  finally:
    if own_cache:
      shutil.rmtree(env["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


if __name__ == "__main__":
  main()
