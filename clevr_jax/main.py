"""Entry point: python -m clevr_jax.main --config=configs/unet_rgb.py[:preset] [--workdir=DIR].

Modes:
  prepare    build the configured dataset into data_dir and print the config
  train      train (resuming from the workdir's newest checkpoint), then evaluate
  evaluate   score every tap of the workdir's newest checkpoint
  baselines  raw-pixel K-Means and random masks (no checkpoint needed)
  report     merge several workdirs' results (--workdirs=A,B,...)
  segment    masks for your own images (any format Pillow reads) (--images, --tap, --num_clusters)

Bad input ends with one `error:` line and exit status 2 (CLEVR_JAX_TRACEBACK=1
shows the traceback). Only this project's log lines and everyone's warnings and
errors are printed; --log_all shows TensorFlow's, TFDS's, JAX's and orbax's too.
"""

from __future__ import annotations

import logging as python_logging
import os
import re
import sys

from clevr_jax import data as data_package  # light: no TensorFlow

data_package.set_tensorflow_environment()  # before anything imports TensorFlow
# Compiled programs persist between runs (JAX's cache; a user's setting wins): the
# quick preset's first train step compiled in 26 s here, and loads in about 2 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "clevr_jax", "jax"))
# Small programs too (JAX keeps only those that compiled for 1 s or more): the
# optimizer's eager initialisation alone compiles dozens, 1-2 s at start-up.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# TensorFlow/TFDS warnings that concern their own setup, not the run.
# Benign: TFDS finds the dataset's folder before its first prepare has written it;
# orbax notes (twice) each read-only checkpoint manager, as evaluation opens them.
_NOISY_WARNINGS = ("Using custom data configuration", "has no dataset_info.json",
                   "CheckpointManagerOptions.read_only=True", "Given directory is read only")

from absl import app  # pylint: disable=g-import-not-at-top  (after the environment)
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ("prepare", "train", "evaluate", "baselines", "report", "segment")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally with ':preset' (quick, synthetic, test).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, logs, results); default runs/<config>[_<preset>].")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "--mode=report: the runs to merge.")
_IMAGES = flags.DEFINE_list(
    "images", [], "--mode=segment: image files (any format Pillow reads) or folders of them.")
_TAP = flags.DEFINE_string("tap", "input", "--mode=segment: the tap to cluster.")
_NUM_CLUSTERS = flags.DEFINE_integer(
    "num_clusters", 0, "--mode=segment: K-Means clusters (K0) of the K-predicting default "
    "segmenter, or K of one that takes K; 0: the segmenter's own.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "--mode=segment/report: where to write.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() with auto-detection (Cloud TPU VMs, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOG_ALL = flags.DEFINE_bool(
    "log_all", False,
    "Also show the INFO lines of TensorFlow, TFDS, JAX and orbax (hidden by default: "
    "only this project's lines, and everyone's warnings and errors, are shown).")


def default_workdir(config) -> str:
  suffix = f"_{config.preset}" if config.preset else ""
  return os.path.join("runs", f"{config.name}{suffix}")


def _initialize_distributed() -> None:
  """Before anything asks JAX for devices or process_index()."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def _run(config, workdir: str) -> None:
  mode = _MODE.value
  from clevr_jax import guards  # pylint: disable=g-import-not-at-top
  # Before any work: a workdir that cannot be written fails now, not at the end.
  if mode in ("train", "evaluate", "baselines"):
    guards.check_writable(workdir)
  elif mode in ("segment", "report") and _OUTPUT_DIR.value:
    guards.check_writable(_OUTPUT_DIR.value, "--output_dir")
  elif mode in ("segment", "report"):
    guards.check_writable(workdir)
  if mode in ("prepare", "train"):
    guards.check_image_size(config)  # before rendering data the model cannot take
  if mode in ("prepare", "train", "evaluate", "baselines"):
    _quiet_progress_bars()
  if mode == "prepare":  # no JAX backend: runs alone on one worker of a slice
    from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    builder = pipeline.prepare(config)
    print(config)
    print(builder.info.splits)
    return
  if mode == "report":
    from clevr_jax import report  # pylint: disable=g-import-not-at-top
    if not _WORKDIRS.value:
      raise ValueError("--mode=report needs --workdirs=A,B,...")
    report.write_report(_WORKDIRS.value, _OUTPUT_DIR.value or workdir)
    return
  _initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info("JAX %s: %d process(es), %d device(s) (%s)", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  if mode == "train":
    from clevr_jax import evaluation, train  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:  # held through the final evaluation too
      with guards.lock(workdir):
        train.train_and_evaluate(config, workdir)
        evaluation.evaluate(config, workdir)
    else:
      train.train_and_evaluate(config, workdir)
      evaluation.evaluate(config, workdir)
  elif mode == "evaluate":
    from clevr_jax import evaluation  # pylint: disable=g-import-not-at-top
    evaluation.evaluate(config, workdir)
  elif mode == "baselines":
    from clevr_jax import evaluation  # pylint: disable=g-import-not-at-top
    evaluation.baselines(config, workdir)
  elif mode == "segment":
    from clevr_jax import evaluation  # pylint: disable=g-import-not-at-top
    if not _IMAGES.value:
      raise ValueError("--mode=segment needs --images=FILE_OR_DIR[,...]")
    evaluation.segment_images(config, workdir, _IMAGES.value, tap=_TAP.value,
                            num_clusters=_NUM_CLUSTERS.value,
                            output_dir=_OUTPUT_DIR.value or os.path.join(workdir, "segments"))


class _ProjectLinesOnly(python_logging.Filter):
  """Keeps this project's lines and everyone's warnings and errors.

  Drops the INFO lines of TFDS ("Load dataset info", "Creating a
  tf.data.Dataset", ...), JAX (the libtpu probe), orbax (dozens per save) and
  TensorFlow, and a few warnings about their own setup. `--log_all` keeps all.
  """

  def filter(self, record: python_logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE_DIR):
      return True
    if record.levelno >= python_logging.ERROR:
      return True
    if record.levelno >= python_logging.WARNING:
      message = record.getMessage()
      return not any(noise in message for noise in _NOISY_WARNINGS)
    return False


def _quiet_libraries() -> None:
  """Before TensorFlow or JAX are imported (main imports them lazily)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # C++ INFO banners (oneDNN, CPU features)
  quiet = _ProjectLinesOnly()
  # On the absl logger and on every root handler: libraries log through either.
  logging.get_absl_logger().addFilter(quiet)
  for handler in python_logging.getLogger().handlers:
    handler.addFilter(quiet)


def _quiet_progress_bars() -> None:
  """TFDS's progress bars are noise in a log file (imports TFDS: call when data is read)."""
  if _LOG_ALL.value or sys.stderr.isatty():
    return
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tfds.disable_progress_bar()


def fail(message: str) -> None:
  """Bad input: one `error:` line that says what to do, exit status 2."""
  logging.flush()
  print(f"error: {message}", file=sys.stderr)
  print("(set CLEVR_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
  sys.exit(2)


def _chain(error: BaseException) -> list[BaseException]:
  """The error and its causes, outermost first."""
  chain = [error]
  while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def _text(error: BaseException) -> str:
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])
  return "; ".join(map(str, error.args)) if len(error.args) > 1 else str(error)


def _flag_error(error: Exception, argv: list[str]) -> str:
  """What went wrong on the command line, in one line."""
  chain = _chain(error)
  for e in reversed(chain):  # the innermost one that suggests a key has it plainly
    text = _text(e)
    if isinstance(e, (KeyError, AttributeError)) and "Did you mean" in text:
      # A locked config refusing a misspelt key: 'skipp'\nDid you mean "skip" ...?
      key = text.splitlines()[0].strip("'\"")
      flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and (
          a.split("=")[0].endswith("." + key) or f".{key}." in a.split("=")[0])),
                  f"--config.{key}")
      hint = text.splitlines()[-1].strip("'\" ")
      return f"{flag}: the config has no key {key!r}. {hint}"
  root = chain[-1]
  if isinstance(root, KeyError):
    return f"the config has no key {_text(root)}: `--mode=prepare` prints every key"
  if isinstance(root, ValueError) and "preset" in str(root):
    return _text(root)  # ours, and it names the flag
  if isinstance(error, flags.Error) and root is not error:
    name = str(error).split(": ", 1)[0].removeprefix("flag ")  # '--config.x=y'
    return f"{name}: {_text(root)}"
  return _text(error)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with bad flags and config files as one `error:` line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (config files raise anything)
    if os.environ.get("CLEVR_JAX_TRACEBACK"):
      raise
    fail(_flag_error(e, argv))
  raise AssertionError("unreachable")


def _load_config():
  try:
    config = _CONFIG.value
    if config is not None:
      config.get("name")  # a file that failed to load raises here, on first use
  except OSError as e:  # the file is missing or unreadable
    root = _chain(e)[-1]
    path = getattr(root, "filename", None) or flags.FLAGS["config"].config_filename
    errno_texts = re.findall(r"\[Errno \d+\] ([^:\n]+)", str(root))
    reason = getattr(root, "strerror", None) or (errno_texts[-1] if errno_texts else str(root))
    raise ValueError(f"cannot load the config file {path!r} ({reason}): give one of "
                     "configs/*.py, e.g. --config=configs/unet_rgb.py:quick") from e
  if config is None:
    raise ValueError("--config is required, e.g. --config=configs/unet_rgb.py:quick")
  return config


def main(argv: list[str]) -> None:
  if not _LOG_ALL.value:
    _quiet_libraries()
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments: {' '.join(argv[1:])} (flags start with --)")
    config = _load_config()
    workdir = _WORKDIR.value or default_workdir(config)
    _run(config, workdir)
  except (FileNotFoundError, ValueError) as e:
    # Bad input (a missing dataset, a wrong path, a corrupt record, a batch that
    # does not divide): say what is wrong and what to do, without a traceback.
    if os.environ.get("CLEVR_JAX_TRACEBACK"):
      raise
    fail(" ".join(str(e).split()))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
