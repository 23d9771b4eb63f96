"""Guards main.py runs once, before any work: the run directory, one run at a time.

(The config is checked in `validate.py`.) `check_writable` runs before a mode
computes anything, so a workdir that is a file or that cannot be written fails
in a second, not after the work.

`lock` is taken once, by process 0 of a training run, around training and the
final evaluation: `<workdir>/.lock` holds the holder's host and pid. A second run on the same workdir stops with both in the
message instead of deleting the first run's unfinished checkpoints. A lock left
by a process that died (SIGKILL, a crash) on this host is taken over; one from
another host cannot be checked and must be removed by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from typing import Iterator

from absl import logging

LOCK_FILE = ".lock"

def is_remote(path: str) -> bool:
  """gs:// and other URLs: the checks below need a local file system."""
  return "://" in path


def check_writable(workdir: str, flag: str = "--workdir") -> None:
  """Creates `workdir` if needed and writes a probe file; ValueError saying what to do."""
  if is_remote(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"{flag}={workdir} is a file, not a directory: choose another {flag}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"cannot write in {flag}={workdir} ({e.strerror or e}): choose a "
                     f"directory you can write to with {flag}=DIR") from None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _read_holder(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _try_create(path: str, me: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(me, f)
  return True


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds `<workdir>/.lock` for the duration."""
  if is_remote(workdir):
    yield
    return
  path = os.path.abspath(os.path.join(workdir, LOCK_FILE))
  me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
  os.makedirs(workdir, exist_ok=True)
  for _ in range(3):  # a stale lock is removed and the creation tried again
    if _try_create(path, me):
      break
    holder = _read_holder(path)
    if holder is None:
      # Empty or cut short: a holder between creating and writing it, or one
      # killed there. Give the first a moment; after that it is stale.
      if time.time() - os.path.getmtime(path) < 5:
        time.sleep(1)
        continue
    elif holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1))):
      raise ValueError(
          f"{workdir} is in use by another run (host {holder.get('host')}, pid "
          f"{holder.get('pid')}): wait for it to end, or use another --workdir. If that "
          f"process is gone (another host cannot be checked from here), delete {path}.")
    logging.warning("taking over the lock of a process that is gone (%s)", holder)
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  else:
    raise ValueError(f"could not take the lock {path}: delete it if no run uses "
                     f"{workdir}, then run again")
  try:
    yield
  finally:
    if (_read_holder(path) or {}).get("pid") == me["pid"]:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
