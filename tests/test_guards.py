"""Checks that run before any work, the workdir lock, the metrics log, and the
TensorFlow-free core. (The command-line side of these is in test_train.py.)"""

import json
import os
import socket
import subprocess
import sys

import pytest

from clevr_jax import defaults
from clevr_jax import guards
from clevr_jax import logs
from clevr_jax import validate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the TensorFlow-free core ---------------------------------------------------

# Everything but the data package, the training/evaluation drivers that read
# data, the pipeline benchmark (which measures the data pipeline) and the GPU
# check (it renders scenes with the NumPy renderer in clevr_jax.data; its own
# no-TensorFlow test is in test_benchmarks.py).
CORE_MODULES = [
    "clevr_jax.models", "clevr_jax.models.slot_attention", "clevr_jax.models.taps", "clevr_jax.segmentation.kmeans", "clevr_jax.metrics", "clevr_jax.training.losses",
    "clevr_jax.training.state", "clevr_jax.training.batch", "clevr_jax.training.train_step", "clevr_jax.schema", "clevr_jax.training.checkpoints", "clevr_jax.logs",
    "clevr_jax.defaults", "clevr_jax.guards", "clevr_jax.validate", "clevr_jax.console",
    "benchmarks.train_benchmark", "benchmarks.kmeans_benchmark",
    "benchmarks.torch_reference", "clevr_jax.sharding",
    "clevr_jax.segmentation.regions", "clevr_jax.segmentation.segmenters",
    "tests.oracles.postprocess_reference", "benchmarks.segmenter_benchmark", "clevr_jax.api",
]

_WITHOUT_TENSORFLOW = """
import importlib, importlib.util, json, sys, tempfile
sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError
try:
  import tensorflow
  raise SystemExit("tensorflow still imports")
except ImportError:
  pass
skipped = []
for name in json.loads(sys.argv[1]):
  if name.endswith("torch_reference") and importlib.util.find_spec("torch") is None:
    skipped.append(name)  # an optional extra
    continue
  module = importlib.import_module(name)
  if name.startswith("benchmarks."):  # each defines its own absl flags; some share names
    from absl import flags
    for flag in flags.FLAGS.get_key_flags_for_module(module):
      delattr(flags.FLAGS, flag.name)
from clevr_jax import logs
with tempfile.TemporaryDirectory() as workdir:  # the writer works without TensorBoard
  writer = logs.MetricWriter(workdir)
  writer.write(1, {"train/loss": 0.5})
  writer.close()
  assert logs.read_metrics(workdir)[0]["train/loss"] == 0.5
loaded = sorted(m for m in sys.modules if m.startswith(("tensorflow", "clevr_jax.data"))
                and sys.modules[m] is not None)
print(json.dumps({"loaded": loaded, "skipped": skipped}))
"""


@pytest.mark.slow  # a child interpreter
def test_core_modules_import_and_log_where_tensorflow_is_absent():
  result = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, json.dumps(CORE_MODULES)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["loaded"] == []
  assert "no TensorBoard" in result.stderr


# --- checks before any work -----------------------------------------------------


@pytest.mark.parametrize("height, suggestion", [(50, "48 (or 64)"), (60, "64 (or 48)"),
                                                (8, "16"), (240, None)])
def test_image_size_the_network_cannot_take_names_the_nearest_that_it_can(height, suggestion):
  config = defaults.get_config("test")
  config.data.image_height = height
  if suggestion is None:
    validate.check_image_size(config)
    return
  with pytest.raises(ValueError, match="divisible by 16") as error:
    validate.check_image_size(config)
  assert f"--config.data.image_height={suggestion}" in str(error.value)


def test_workdir_that_is_a_file_or_below_one_is_refused(tmp_path):
  a_file = tmp_path / "f"
  a_file.write_text("")
  with pytest.raises(ValueError, match="is a file"):
    guards.check_writable(str(a_file))
  with pytest.raises(ValueError, match="cannot write in --output_dir="):
    guards.check_writable(str(a_file / "sub"), "--output_dir")
  guards.check_writable(str(tmp_path / "new" / "run"))  # created
  assert (tmp_path / "new" / "run").is_dir()


# --- the lock -------------------------------------------------------------------


def _hold(workdir, pid, host=None):
  (workdir / guards.LOCK_FILE).write_text(
      json.dumps({"host": host or socket.gethostname(), "pid": pid}))


def test_lock_is_taken_once_and_released(tmp_path):
  path = tmp_path / guards.LOCK_FILE
  with guards.lock(str(tmp_path)):
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # Taken once (by main): a second taker, even this process, is another run.
    with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
      with guards.lock(str(tmp_path)):
        pass
    assert path.exists()
  assert not path.exists()


def test_lock_held_by_a_live_process_is_refused_naming_it(tmp_path):
  _hold(tmp_path, os.getppid())
  with pytest.raises(ValueError, match=rf"host {socket.gethostname()}, pid {os.getppid()}"):
    with guards.lock(str(tmp_path)):
      pass
  assert json.loads((tmp_path / guards.LOCK_FILE).read_text())["pid"] == os.getppid()


def test_lock_from_another_host_is_refused(tmp_path):
  _hold(tmp_path, 1, host="elsewhere")
  with pytest.raises(ValueError, match="host elsewhere, pid 1.*delete"):
    with guards.lock(str(tmp_path)):
      pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", ""])
  dead.wait()
  _hold(tmp_path, dead.pid)
  with guards.lock(str(tmp_path)):
    assert json.loads((tmp_path / guards.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert not (tmp_path / guards.LOCK_FILE).exists()


# --- metrics.jsonl --------------------------------------------------------------


def _strict(line):
  def reject(name):
    raise ValueError(name)
  return json.loads(line, parse_constant=reject)


def test_metrics_log_is_strict_json_even_for_non_finite_values(tmp_path):
  writer = logs.MetricWriter(str(tmp_path))
  writer.write(1, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "x": 2.0})
  writer.close()
  (line,) = (tmp_path / logs.METRICS_FILE).read_text().splitlines()
  record = _strict(line)
  assert record["train/loss"] is None and record["train/grad_norm"] is None
  assert record["x"] == 2.0


def test_records_after_the_restored_step_are_dropped(tmp_path):
  path = tmp_path / logs.METRICS_FILE
  lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (2, 4, 6)]
  path.write_text("\n".join(lines) + "\n" + '{"step": 8, "tra')  # cut by a kill
  assert logs.drop_records_after(str(tmp_path), 4) == 2
  assert [r["step"] for r in logs.read_metrics(str(tmp_path))] == [2, 4]
  assert logs.drop_records_after(str(tmp_path), 4) == 0
