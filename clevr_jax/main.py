"""Entry point: python -m clevr_jax.main --config=configs/unet_rgb.py[:preset] [--workdir=DIR].

Modes:
  prepare    build the configured dataset into data_dir and print the config
  train      train (resuming from the workdir's newest checkpoint), then evaluate
  evaluate   score every tap of the workdir's newest checkpoint
  baselines  raw-pixel K-Means and random masks (no checkpoint needed)
  report     merge several workdirs' results (--workdirs=A,B,...)
  segment    masks for your own PNG images (--images, --tap, --num_clusters)
"""

from __future__ import annotations

import logging as python_logging
import os
import sys

os.environ.setdefault("NO_GCE_CHECK", "true")

from absl import app  # pylint: disable=g-import-not-at-top  (after NO_GCE_CHECK)
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
_NUM_CLUSTERS = flags.DEFINE_integer("num_clusters", 11, "--mode=segment: K.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "--mode=segment/report: where to write.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() with auto-detection (Cloud TPU VMs, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def default_workdir(config) -> str:
  suffix = f"_{config.preset}" if config.preset else ""
  return os.path.join("runs", f"{config.name}{suffix}")


def _initialize_distributed() -> None:
  """Before anything asks JAX for devices or process_index()."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def _run(config, workdir: str) -> None:
  mode = _MODE.value
  if mode == "prepare":  # no JAX backend: runs alone on one worker of a slice
    from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    builder = pipeline.prepare(config)
    print(config)
    print(builder.info.splits)
    return
  if mode == "report":
    from clevr_jax import report  # pylint: disable=g-import-not-at-top
    if not _WORKDIRS.value:
      raise app.UsageError("--mode=report needs --workdirs=A,B,...")
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
      raise app.UsageError("--mode=segment needs --images=FILE_OR_DIR[,...]")
    evaluation.segment_images(config, workdir, _IMAGES.value, tap=_TAP.value,
                            num_clusters=_NUM_CLUSTERS.value,
                            output_dir=_OUTPUT_DIR.value or os.path.join(workdir, "segments"))


class _QuietOrbax:
  """Drops orbax's per-save INFO lines (dozens per checkpoint); keeps its warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= python_logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  # On the logger, not a handler: libraries may have added their own root handlers.
  logging.get_absl_logger().addFilter(_QuietOrbax())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/unet_rgb.py:quick")
  workdir = _WORKDIR.value or default_workdir(config)
  try:
    _run(config, workdir)
  except (FileNotFoundError, ValueError) as e:
    # Bad input (a missing dataset, a wrong path, a corrupt record, a batch that
    # does not divide): say what is wrong and what to do, without a traceback.
    if os.environ.get("CLEVR_JAX_TRACEBACK"):
      raise
    logging.error("%s", e)
    print(f"error: {e}\n(set CLEVR_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
