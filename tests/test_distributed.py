"""Multi-process data parallelism on localhost: 2 processes x 2 CPU devices (gloo)
train and evaluate like 1 process x 4 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT_S = 600  # a hung collective fails the test instead of hanging CI


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(num_processes, devices, data_dir, workdir, eval_workdir, out, wait_for=""):
  """Starts the run's processes; `_finish` waits for them and reads what they wrote."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # Output to files, not pipes: a process blocked on a full pipe that nobody
  # reads yet would stall the collectives of the others.
  logs = [open(f"{out}.process{i}.log", "w+") for i in range(num_processes)]
  procs = [subprocess.Popen(
      [sys.executable, WORKER, str(i), str(num_processes), str(port), str(devices),
       data_dir, workdir, eval_workdir, out, wait_for], env=env, stdout=log,
      stderr=subprocess.STDOUT, text=True) for i, log in enumerate(logs)]
  return procs, logs, out


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _finish(run):
  procs, logs, out = run
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    _kill(procs)
  for p, log in zip(procs, logs):
    log.seek(0)
    assert p.returncode == 0, log.read()[-3000:]
    log.close()
  with open(out + ".json") as f:
    results = json.load(f)
  params = np.load(out + ".npz")
  return results, [params[k] for k in params.files]


def test_two_processes_equal_one_process_with_the_same_devices(tmp_path, data_dir):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  one_out = str(tmp_path / "one_out")
  # Both runs at once (their start-ups and compiles overlap on two cores). The
  # two processes evaluate the single process's checkpoint: the same features,
  # so any difference in the figures would come from how the work is split.
  # They wait for it after their own training: the single run writes
  # one_out.npz once its training and evaluation are done.
  single_run = _start(1, 4, data_dir, one, one, one_out)
  multi_run = _start(2, 2, data_dir, two, one, str(tmp_path / "two_out"),
                     wait_for=one_out + ".npz")
  try:
    single, single_params = _finish(single_run)
  except BaseException:
    _kill(multi_run[0])  # it would wait for a checkpoint that never comes
    raise
  multi, multi_params = _finish(multi_run)
  assert (single["devices"], single["processes"]) == (4, 1)
  assert (multi["devices"], multi["processes"]) == (4, 2)
  assert len(single_params) == len(multi_params)
  # Not bitwise: gloo's cross-process all-reduce sums in another order (measured
  # max |diff| 2.5e-5 after one epoch).
  for a, b in zip(single_params, multi_params):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
  # Each process segments its own images and the hosts exchange contingency
  # tables: the same figures, for every segmenter (post-processing ones included).
  assert list(multi["segmenters"]) == list(single["segmenters"])
  for name, by_tap in single["segmenters"].items():
    for tap, row in by_tap.items():
      for metric, value in row.items():
        assert multi["segmenters"][name][tap][metric] == pytest.approx(value, abs=1e-6), (
            name, tap, metric)
