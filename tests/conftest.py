"""Fixtures shared by the whole test suite.

Session fixtures (each built once, on first use):

  data_dir         str: a session temporary directory in which the `:test`
                   synthetic dataset (48x64 images, 32 train / 12 test scenes)
                   is prepared once with `clevr_jax.data.pipeline.prepare`.
                   Every `configs/*.py:test` config reads this same dataset
                   (grayscale images and supervised targets are made when
                   reading).
  test_config      factory: `test_config(name="unet_rgb")` returns a fresh,
                   unlocked `configs/<name>.py:test` ConfigDict whose
                   `data.data_dir` is `data_dir`. A new object every call:
                   change it freely.
  trained_workdir  str: a workdir in which `train.train_and_evaluate` trained
                   `unet_rgb:test` once, in this process: 2 epochs of 4 steps,
                   checkpoints of steps 4 and 8, metrics.jsonl, tensorboard/,
                   previews/. Tests may add files (evaluation results) but must
                   not train in it or change its checkpoints: other tests
                   compare against them.
  run_python       function: `run_python(args, devices=None, timeout=600)`
                   runs `python *args` in a child process from the repository
                   root and returns its `subprocess.CompletedProcess` (text
                   stdout and stderr; a non-zero exit is returned, not raised;
                   killed past `timeout`). `devices=N` runs the child on N
                   (simulated) CPU devices: JAX_PLATFORMS=cpu and
                   XLA_FLAGS=--xla_force_host_platform_device_count=N; this
                   process keeps JAX's default devices.
  start_python     the same, without waiting: `start_python(args, devices=None,
                   env=None)` (`env`: variables to set in the child)
                   returns a started `Child`; `child.result(timeout=600)` waits
                   for it. On two cores, a child overlaps with the work of this
                   process (compiling is single-threaded). Children still running
                   when the session ends are killed.
  data_parallel_run
                   factory: `data_parallel_run(devices, wait=True,
                   float64=False)` returns a DataParallelRun in which
                   `tests/helpers/data_parallel.py` ran, on `devices` devices,
                   3 train steps of `unet_gray:test` with Adam's eps=1 (see the
                   helper) on the first global batch of the training split,
                   wrote the state and the step metrics to `.npz` and (float32
                   only) saved the state as an orbax checkpoint in
                   `.checkpoint_dir`. `float64=True`: the steps in float64 (the
                   helper's --float64), on a smaller network (depth 2, width 4),
                   for comparisons across device counts. One child per
                   (devices, float64), started by the first call; `wait=False`
                   only starts it (a module may start it early, to overlap it
                   with its own work), `wait=True` also checks it succeeded.
  distributed_runs DistributedRuns: tests/helpers/distributed_worker.py as
                   1 process x 4 devices and as 2 processes x 2 devices
                   (gloo), all three started together; `.single` and `.multi`
                   are their Child lists, `.single_out` and `.multi_out` the
                   paths (without .npz/.json) that process 0 of each writes.

Some children are started when the session's first test starts, not when the
test that reads them does (`_START_EARLY`, `_DATA_PARALLEL_EARLY`): the
in-process tests leave one of the two cores idle much of the time, and these
children fill it.

Two tiers: every test that uses a fixture in `SLOW_FIXTURES` (children, the
trained checkpoint) is marked `slow`, as are the tests that start processes or
train by other means; `pytest -m "not slow"` is the fast tier for the inner loop.

Why not pytest-xdist for the full suite: its workers each hold their own session,
so each would prepare the dataset, train `trained_workdir` and start the
data-parallel and distributed children again, and on 2 cores those children
already keep the second core busy beside this process. What remains of the
scheduling above is the list of children to start early. The suite does run under
xdist: the fast tier passed with `-n 2` on 350 tests in 206 CPU seconds, where one
process took 202 for the same tests plus one since marked slow (a 43 s training
run), all at load averages of 2-28 on 2 cores shared with five other jobs, so
their wall times (8-10 min) say nothing. On an idle 2-core machine `-n 2` could
about halve the fast tier's wall time; it fits its 5 minutes without, so xdist is
not a dependency.

Compiled work is shared through JAX's persistent compilation cache. Compiling
the U-Net (its threefry initialisation above all) takes tens of seconds on a
CPU, and every run of `train_and_evaluate` builds new jitted functions, so
without the cache each test and each child process would compile the same
programs again. The cache lives in a session temporary directory (or in
$JAX_COMPILATION_CACHE_DIR when that is set), is configured before any test
compiles, and reaches child processes through the environment. It stores every
program, also those that compile in under a second (JAX's default leaves them out).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(REPO_ROOT, "tests", "helpers")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

# Before JAX is imported anywhere in this process: its config reads the
# environment at import, and children inherit the variable.
_OWN_CACHE_DIR = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="clevr_jax_test_jit_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
# Every program, however quick to compile: the suite builds the same small ones
# (optax's set-up, the derivations, the eval steps) in many runs and children.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Compiled for compiling fast, not for running fast: the suite's programs are
# small and run a few times each, so XLA:CPU's compile dominates (a two-level
# U-Net train step: 16-19 CPU seconds to compile by default, 9.5-10.3 with
# LLVM's optimisations off). It changes how well the machine code is
# optimised; no fast math either way, so results move by rounding at most
# (the float64 device-count comparisons still agree to ~1e-15). Children inherit it
# through the environment. (Adding --xla_cpu_use_fusion_emitters=false cut
# compiles further but moved those float64 comparisons to ~1e-8: not used.)
# One end-to-end run (tests/test_train.py) sets XLA_FLAGS='' instead: compiled as users
# compile it.
SUITE_XLA_FLAGS = ("--xla_backend_optimization_level=0",)
_xla_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(
    _xla_flags + [f for f in SUITE_XLA_FLAGS
                  if f.split("=")[0] not in {g.split("=")[0] for g in _xla_flags}])

# TensorFlow's settings, as the entry point sets them (the pipeline sets none at import).
from clevr_jax import data as _data_package  # pylint: disable=g-import-not-at-top,wrong-import-position
_data_package.set_tensorflow_environment()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# In case JAX was imported (by a plugin) before this module.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


_CHILDREN = []  # every Child started, to stop those a session leaves running

# A test that uses one of these starts child processes or trains a network: it is
# `slow` (pyproject.toml), left out of the fast tier `pytest -m "not slow"`. Tests
# that start processes or train by other means carry the mark themselves.
SLOW_FIXTURES = frozenset({"run_python", "start_python", "data_parallel_run",
                           "distributed_runs", "trained_workdir"})


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  for child in _CHILDREN:
    child.stop()


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE_DIR:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


def _load_config(name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"configs.{name}").get_config("test")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  config = _load_config("unet_rgb")
  config.data.data_dir = path
  pipeline.prepare(config)
  return path


@pytest.fixture(scope="session")
def test_config(data_dir):
  def make(name: str = "unet_rgb"):
    config = _load_config(name)
    config.data.data_dir = data_dir
    return config
  return make


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, test_config) -> str:
  from clevr_jax.training import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("trained") / "unet_rgb_test")
  train.train_and_evaluate(test_config("unet_rgb"), workdir)
  return workdir


def child_env(devices: int | None = None, extra: dict[str, str] | None = None
              ) -> dict[str, str]:
  """This process's environment, for a child on `devices` CPU devices if given.

  Without `devices` the child runs where this process does. The device-count
  flag is left out for a single device, so that the child's programs match
  this process's ones in the compilation cache (XLA_FLAGS are part of its key).
  """
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  if devices is not None:
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
      flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env.update(extra or {})
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


class Child:
  """A child Python process, started at once; `result()` waits for it (once).

  Its output goes to files, not pipes: a child that logs more than a pipe
  holds would otherwise stop until someone reads it.
  """

  def __init__(self, args, devices: int | None = None, env: dict[str, str] | None = None):
    self.args = [sys.executable, *map(str, args)]
    self.devices = devices
    self._stdout = tempfile.TemporaryFile("w+")
    self._stderr = tempfile.TemporaryFile("w+")
    self._process = subprocess.Popen(self.args, cwd=REPO_ROOT, env=child_env(devices, env),
                                     stdout=self._stdout, stderr=self._stderr, text=True)
    self._result = None
    _CHILDREN.append(self)

  def stop(self) -> None:
    """Kills it if it still runs (a test that started it was deselected or failed)."""
    if self._process.poll() is None:
      self._process.kill()
      self._process.wait()

  def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
    """Its exit status and output; killed past `timeout`, so CI never hangs."""
    if self._result is None:
      note = ""
      try:
        self._process.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        self.stop()
        note = f"\n[killed after {timeout} s]"
      outputs = []
      for f in (self._stdout, self._stderr):
        f.seek(0)
        outputs.append(f.read())
        f.close()
      self._result = subprocess.CompletedProcess(self.args, self._process.returncode,
                                                 outputs[0], outputs[1] + note)
    return self._result


@pytest.fixture(scope="session")
def start_python():
  return Child


@pytest.fixture(scope="session")
def run_python():
  def run(args, devices: int | None = None, timeout: float = 600
          ) -> subprocess.CompletedProcess:
    return Child(args, devices).result(timeout)
  return run


@dataclasses.dataclass(frozen=True)
class DataParallelRun:
  devices: int
  npz: str
  checkpoint_dir: str
  child: Child


@pytest.fixture(scope="session")
def data_parallel_run(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("data_parallel")
  runs: dict[tuple[int, bool], DataParallelRun] = {}

  def get(devices: int, wait: bool = True, float64: bool = False) -> DataParallelRun:
    key = (devices, float64)
    if key not in runs:
      name = f"devices{devices}{'_float64' if float64 else ''}"
      npz, checkpoint_dir = str(root / f"{name}.npz"), str(root / f"checkpoint_{name}")
      if float64:
        extra = ["--float64", "--config.model.depth=2", "--config.model.base_width=4"]
      else:
        extra = [f"--save_checkpoint={checkpoint_dir}"]
      runs[key] = DataParallelRun(devices, npz, checkpoint_dir, Child(
          [os.path.join(HELPERS, "data_parallel.py"),
           f"--config={REPO_ROOT}/configs/unet_gray.py:test",
           f"--config.data.data_dir={data_dir}", "--config.optimizer.eps=1.0",
           "--steps=3", f"--out={npz}", *extra],
          devices=devices))
    run = runs[key]
    if wait:
      result = run.child.result()
      assert result.returncode == 0, f"{devices} device(s):\n{result.stderr[-5000:]}"
    return run

  return get


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class DistributedRuns:
  single: list[Child]
  multi: list[Child]
  single_out: str
  multi_out: str


@pytest.fixture(scope="session")
def distributed_runs(tmp_path_factory, data_dir) -> DistributedRuns:
  root = tmp_path_factory.mktemp("distributed")
  worker = os.path.join(HELPERS, "distributed_worker.py")
  one, two = str(root / "one"), str(root / "two")
  single_out, multi_out = str(root / "one_out"), str(root / "two_out")
  # The two processes evaluate the single process's checkpoint (the same
  # features, so any difference in the figures comes from how the work is
  # split): they wait for it after their own training, until the single run
  # writes single_out.npz once its training and evaluation are done.
  single = [Child([worker, 0, 1, 0, data_dir, one, one, single_out], devices=4)]  # no port
  port = _free_port()
  multi = [Child([worker, i, 2, port, data_dir, two, one, multi_out, single_out + ".npz"],
                 devices=2) for i in range(2)]
  return DistributedRuns(single, multi, single_out, multi_out)


# Session fixtures whose children take longest, started with the first test.
_START_EARLY = ("distributed_runs",)
# The data-parallel children that tests read, as data_parallel_run's
# (devices, float64): test_steps.py compares the float64 ones, test_train.py
# restores the float32 one's checkpoint. Started with the first test too: at
# the end of the suite test_train.py's own dozen children already fill both cores.
_DATA_PARALLEL_EARLY = ((1, True), (4, True), (4, False))


@pytest.fixture(scope="session", autouse=True)
def _start_early(request):
  wanted = {name for item in request.session.items
            for name in getattr(item, "fixturenames", ())}
  for name in _START_EARLY:
    if name in wanted:
      request.getfixturevalue(name)
  if "data_parallel_run" in wanted:
    start = request.getfixturevalue("data_parallel_run")
    for devices, float64 in _DATA_PARALLEL_EARLY:
      start(devices, wait=False, float64=float64)
