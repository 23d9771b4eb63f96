"""What the command line prints: the process's environment, quiet libraries, one-line endings.

By default only this project's log lines and everyone's warnings and errors are
printed, except the errors orbax and asyncio log on the way to raising one
(orbax's writer threads, unretrieved tasks, coroutines dropped with their event
loop): that exception reaches the entry point, which prints one `error:` line.
`--log_all` shows everything.
"""

from __future__ import annotations

import inspect
import logging as python_logging
import os
import sys
from typing import NoReturn

from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Warnings that concern the libraries' own setup, not the run. Benign: TFDS finds
# the dataset's folder before its first prepare has written it; orbax notes
# (twice) each read-only checkpoint manager, as evaluation opens them.
_NOISY_WARNINGS = ("Using custom data configuration", "has no dataset_info.json",
                   "CheckpointManagerOptions.read_only=True", "Given directory is read only")
# Libraries that log an error, with its traceback, and then raise it to us.
_RAISE_WHAT_THEY_LOG = (os.sep + "orbax" + os.sep, os.sep + "asyncio" + os.sep)

INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports it


def set_environment() -> None:
  """Settings JAX and TensorFlow read when imported (a user's own setting wins)."""
  from clevr_jax import data  # pylint: disable=g-import-not-at-top  (light: no TensorFlow)
  data.set_tensorflow_environment()
  # Compiled programs persist between runs: the quick preset's first train step
  # compiled in 26 s here, and loads in about 2 s.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "clevr_jax", "jax"))
  # Small programs too (JAX keeps only those that compiled for 1 s or more): the
  # optimizer's eager initialisation alone compiles dozens, 1-2 s at start-up.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


class _ProjectLinesOnly(python_logging.Filter):
  """This project's lines, and the others' warnings and the errors they do not raise."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE_DIR):
      return True
    if record.levelno >= python_logging.ERROR:
      return not any(part in record.pathname for part in _RAISE_WHAT_THEY_LOG)
    if record.levelno >= python_logging.WARNING:
      message = record.getMessage()
      return not any(noise in message for noise in _NOISY_WARNINGS)
    return False


def _raised_in_asyncio(traceback) -> bool:
  last = traceback
  while last is not None and last.tb_next is not None:
    last = last.tb_next
  return last is not None and _RAISE_WHAT_THEY_LOG[1] in last.tb_frame.f_code.co_filename


def _unraisable(unraisable) -> None:
  """Drops what is left of orbax's asyncio work once its event loop is closed:
  coroutines collected unawaited, and TensorStore's write callbacks that reach
  the closed loop after a failed save (the save's own error is raised to us)."""
  if (inspect.iscoroutine(unraisable.object)
      or "asyncio" in type(unraisable.object).__module__
      or _raised_in_asyncio(unraisable.exc_traceback)):
    return
  sys.__unraisablehook__(unraisable)


def quiet_libraries(log_all: bool) -> None:
  """Before TensorFlow or JAX are imported (main imports them lazily)."""
  if log_all:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # C++ INFO banners (oneDNN, CPU features)
  quiet = _ProjectLinesOnly()
  # On the absl logger and on every root handler: libraries log through either.
  logging.get_absl_logger().addFilter(quiet)
  for handler in python_logging.getLogger().handlers:
    handler.addFilter(quiet)
  sys.unraisablehook = _unraisable


def quiet_progress_bars(log_all: bool) -> None:
  """TFDS's progress bars are noise in a log file (imports TFDS: call when data is read)."""
  if log_all or sys.stderr.isatty():
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()


def _end(line: str, status: int) -> NoReturn:
  logging.flush()
  sys.stdout.flush()
  print(line, file=sys.stderr)
  sys.stderr.flush()
  # Leave without running the libraries' exit handlers: after a failed save,
  # orbax's threads and event loops would print their errors again.
  os._exit(status)  # pylint: disable=protected-access


def fail(error: Exception | str) -> NoReturn:
  """Bad input: one `error:` line that says what to do, exit status 2.

  With CLEVR_JAX_TRACEBACK=1 an exception is raised again instead, traceback and all.
  """
  if isinstance(error, Exception) and os.environ.get("CLEVR_JAX_TRACEBACK"):
    raise error
  message = str(error)
  _end(f"error: {' '.join(str(message).split())}\n"
       "(set CLEVR_JAX_TRACEBACK=1 for the traceback)", 2)


def interrupted(workdir: str, mode: str) -> NoReturn:
  """Ctrl-C: one line that says where training resumes, exit status 130."""
  from clevr_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  step = checkpoints.newest_step_on_disk(workdir) if workdir else None
  if mode != "train":
    line = f"--mode={mode} stopped before it finished; run the same command again"
  elif step is None:
    line = "no checkpoint was saved yet: run the same command again to train from step 0"
  else:
    line = (f"run the same command again to resume training from step {step} "
            f"(its checkpoint is in {workdir})")
  _end(f"interrupted: {line}", INTERRUPTED_STATUS)
