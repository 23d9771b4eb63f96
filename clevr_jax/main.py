"""Entry point: python -m clevr_jax.main --config=configs/unet_rgb.py[:preset] [--workdir=DIR].

Modes:
  prepare    build the configured dataset into data_dir and print the config
  train      train (resuming from the workdir's newest checkpoint), then evaluate
  evaluate   score every tap of the workdir's newest checkpoint
  baselines  raw-pixel K-Means and random masks (no checkpoint needed)
  report     merge several workdirs' results (--workdirs=A,B,...)
  segment    masks for your own images (any format Pillow reads) (--images, --tap, --num_clusters)
  score_features  any model's per-pixel features of the test images through every
             segmenter (--features=FOLDER: <index>.npy or .npz shards; a folder per set)
  score_masks     any method's predicted label maps of the test images, every metric
             (--masks=FOLDER: <index>.npy or 8/16-bit <index>.png)

Bad input ends with one `error:` line and exit status 2 (CLEVR_JAX_TRACEBACK=1
shows the traceback); Ctrl-C with one line that says where training resumes,
exit status 130. `--log_all` shows the libraries' INFO lines too.
"""

from __future__ import annotations

import contextlib
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from clevr_jax import console
from clevr_jax import validate

MODES = ("prepare", "train", "evaluate", "baselines", "report", "segment", "score_features",
         "score_masks")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally with ':preset' (quick, synthetic, test).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config>[_<preset>].")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "--mode=report: the runs to merge.")
_IMAGES = flags.DEFINE_list("images", [], "--mode=segment: image files or folders of them.")
_TAP = flags.DEFINE_string("tap", "input", "--mode=segment: the tap to cluster.")
_NUM_CLUSTERS = flags.DEFINE_integer(
    "num_clusters", 0, "--mode=segment: K-Means clusters (K0) of the K-predicting default "
    "segmenter, or K of one that takes K; 0: the segmenter's own.")
_FEATURES = flags.DEFINE_string(
    "features", None, "--mode=score_features: a folder of <index>.npy / .npz features per test "
    "image, or a folder of such folders (one feature set each).")
_MASKS = flags.DEFINE_string(
    "masks", None, "--mode=score_masks: a folder of <index>.npy / .png label maps per test "
    "image, or a folder of such folders.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "--mode=segment/report/score_features/score_masks: where to write "
    "(default: the workdir, or its segments/, score_features/, score_masks/).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "jax.distributed.initialize() auto-detected (Cloud TPU VMs, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOG_ALL = flags.DEFINE_bool("log_all", False, "Also show the libraries' INFO lines.")


def default_workdir(config) -> str:
  return os.path.join("runs", config.name + (f"_{config.preset}" if config.preset else ""))


def train_rounds(config, workdir: str) -> None:
  """Round 0, then any self-training rounds, each trained and scored in its workdir;
  Ctrl-C ends with the line that names the round's own workdir and step."""
  import jax  # pylint: disable=g-import-not-at-top
  from clevr_jax import evaluation  # pylint: disable=g-import-not-at-top
  from clevr_jax import guards  # pylint: disable=g-import-not-at-top
  from clevr_jax.objects import self_training  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import train  # pylint: disable=g-import-not-at-top
  for round_config, round_workdir in [(config, workdir)] + self_training.rounds(
      config, workdir):
    try:
      with guards.lock(round_workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        train.train_and_evaluate(round_config, round_workdir)  # locked through the evaluation
        evaluation.evaluate(round_config, round_workdir)
    except KeyboardInterrupt:  # the lock is released: the same command resumes this round
      console.interrupted(round_workdir, "train")


def run(config, workdir: str, mode: str) -> None:
  """Validates once, then one call per mode (each imports what it needs: after JAX joins)."""
  from clevr_jax import guards  # pylint: disable=g-import-not-at-top
  validate.check_mode_flags(mode, _WORKDIRS.value, _IMAGES.value, _FEATURES.value,
                            _MASKS.value)
  if mode not in ("prepare", "report"):  # these two start no JAX backend
    from clevr_jax import sharding  # pylint: disable=g-import-not-at-top
    devices = sharding.join_processes(_COORDINATOR.value, _NUM_PROCESSES.value,
                                      _PROCESS_ID.value, auto_detect=_DISTRIBUTED.value)
  else:
    devices = None
  validate.check_config(config, mode, devices, workdir)
  subfolder = {"segment": "segments", "score_features": "score_features",
               "score_masks": "score_masks"}.get(mode)
  output = _OUTPUT_DIR.value or (os.path.join(workdir, subfolder) if subfolder else workdir)
  if mode != "prepare":  # a folder that cannot be written fails now, not after the work
    guards.check_writable(*((output, "--output_dir") if _OUTPUT_DIR.value else (workdir,)))
  if mode in ("prepare", "train", "evaluate", "baselines", "score_features",
              "score_masks"):  # the modes that read data
    console.quiet_progress_bars(_LOG_ALL.value)
  if mode == "prepare":  # no JAX backend: runs alone on one worker of a slice
    from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    print(config, pipeline.prepare(config).info.splits, sep="\n")
    return
  if mode == "report":  # no TensorFlow, no JAX backend
    from clevr_jax import report  # pylint: disable=g-import-not-at-top
    report.write_report(_WORKDIRS.value, output)
    return
  from clevr_jax import evaluation  # pylint: disable=g-import-not-at-top
  if mode == "train":
    train_rounds(config, workdir)
  elif mode == "evaluate":
    evaluation.evaluate(config, workdir)
  elif mode == "baselines":
    evaluation.baselines(config, workdir)
  elif mode == "score_features":
    evaluation.score_features(config, _FEATURES.value, output)
  elif mode == "score_masks":
    evaluation.score_masks(config, _MASKS.value, output)
  else:
    evaluation.segment_images(config, workdir, _IMAGES.value, tap=_TAP.value,
                              num_clusters=_NUM_CLUSTERS.value, output_dir=output)


def main(argv: list[str]) -> None:
  console.set_environment()
  console.quiet_libraries(_LOG_ALL.value)
  workdir = _WORKDIR.value or ""
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments: {' '.join(argv[1:])} (flags start with --)")
    if _CONFIG.value is None:
      raise ValueError("--config is required, e.g. --config=configs/unet_rgb.py:quick")
    workdir = _WORKDIR.value or default_workdir(_CONFIG.value)
    run(_CONFIG.value, workdir, _MODE.value)
  except (FileNotFoundError, ValueError) as e:  # bad input: what is wrong, what to do
    console.fail(e)
  except KeyboardInterrupt:  # Ctrl-C: training saved its step (train.py) and stopped
    console.interrupted(workdir, _MODE.value)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing after the validation pass: a bad flag is one `error:` line."""
  try:
    validate.check_command_line(argv[1:])
    return flags.FLAGS(argv)
  except (ValueError, flags.Error) as e:
    console.fail(e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
