"""Multi-process data parallelism on localhost: 2 processes x 2 CPU devices (gloo)
train and evaluate like 1 process x 4 devices (the `distributed_runs` fixture,
whose processes start with the session's first test)."""

import json

import numpy as np
import pytest

TIMEOUT_S = 600  # a hung collective fails the test instead of hanging CI


def _finish(children, out):
  """Waits for a run's processes; what its process 0 wrote."""
  for child in children:
    result = child.result(timeout=TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  with open(out + ".json") as f:
    results = json.load(f)
  params = np.load(out + ".npz")
  return results, [params[k] for k in params.files]


def test_two_processes_equal_one_process_with_the_same_devices(distributed_runs):
  runs = distributed_runs
  try:
    single, single_params = _finish(runs.single, runs.single_out)
  except BaseException:
    for child in runs.multi:  # they would wait for a checkpoint that never comes
      child.stop()
    raise
  multi, multi_params = _finish(runs.multi, runs.multi_out)
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
