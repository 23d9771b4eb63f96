"""The one validation pass of the entry point: the command line, then the config.

`check_command_line` runs before absl parses the flags: the config file must
exist and load, and every `--config.KEY=...` override must name a key the
config has. `check_config` runs once the devices are known: every setting a
mode reads is in range, the image halves `model.depth` times, and the global
batches divide over the devices. Each error is one ValueError that names the
flag to change and a value that works; nothing below the entry point checks
the config again.

`check_command_line` is pure Python: it runs before JAX or TensorFlow is imported.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections

TASKS = ("reconstruction", "segmentation")
# Settings that count something: 0 or less would divide by zero or never happen.
_POSITIVE = ("batch_size", "eval.batch_size", "num_epochs", "log_every_steps",
             "checkpoint_every_steps", "keep_checkpoints", "model.base_width", "model.depth",
             "eval.kmeans.num_restarts", "eval.kmeans.max_iter", "eval.kmeans.fixed_k",
             "eval.max_regions")
_NON_NEGATIVE = ("num_train_steps", "eval.max_images", "eval.num_figure_images", "num_preview_images",
                 "optimizer.warmup_steps", "data.eval_file_height", "data.eval_file_width")
# The modes that run batches over the devices, and the batches each one runs.
_BATCHES = {"train": ("batch_size", "eval.batch_size"), "evaluate": ("eval.batch_size",),
            "baselines": ("eval.batch_size",)}


def split_config_argument(value: str) -> tuple[str, str | None]:
  """`configs/x.py:preset` -> (path, preset); the path alone has no preset."""
  if not os.path.exists(value) and ":" in value:
    path, preset = value.rsplit(":", 1)
    return path, preset
  return value, None


def load_config_file(value: str) -> ml_collections.ConfigDict:
  """The config of `--config=PATH[:preset]`, loaded as ml_collections will load it."""
  path, preset = split_config_argument(value)
  if not os.path.isfile(path):
    reason = "is a directory" if os.path.isdir(path) else "No such file or directory"
    raise ValueError(f"cannot load the config file {path!r} ({reason}): give one of "
                     "configs/*.py, e.g. --config=configs/unet_rgb.py:quick")
  spec = importlib.util.spec_from_file_location("_clevr_jax_config_check", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config(*([preset] if preset is not None else []))
  except ValueError:  # ours (an unknown preset): it names the flag already
    raise
  except Exception as e:  # pylint: disable=broad-except  (a config file may raise anything)
    raise ValueError(f"the config file {path!r} does not load ({type(e).__name__}: {e})"
                     ) from e
  return config


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  paths = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += _leaves(value, f"{prefix}{key}.")
    else:
      paths.append(prefix + key)
  return paths


def check_override(config: ml_collections.ConfigDict, flag: str) -> None:
  """`--config.a.b=v` (or `--[no]config.a.b`): ValueError unless the config has a.b."""
  name = flag.lstrip("-").split("=", 1)[0]
  key_path = name.removeprefix("no").removeprefix("config.")
  node, walked = config, []
  for key in key_path.split("."):
    if isinstance(node, ml_collections.ConfigDict) and key in node:
      node, walked = node[key], walked + [key]
      continue
    where = ".".join(walked)
    siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    close = difflib.get_close_matches(key, siblings, n=1)
    if close:
      hint = f'Did you mean "{close[0]}"?'
    else:
      same_name = [p for p in _leaves(config) if p.rsplit(".", 1)[-1] == key]
      hint = (f"Keys of that name: {', '.join('--config.' + p for p in same_name)}."
              if same_name else "`--mode=prepare` prints every key.")
    raise ValueError(f"--{name}: the config has no key {key!r}"
                     + (f" in config.{where}" if where else "") + f". {hint}")


def check_command_line(argv: Sequence[str]) -> None:
  """Before absl parses `argv`: the config file loads and each override names a key."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  overrides = [a for a in argv if a.startswith(("--config.", "--noconfig."))]
  if not values:
    return  # main says that --config is required
  config = load_config_file(values[-1])
  for flag in overrides:
    check_override(config, flag)


def _get(config: ml_collections.ConfigDict, path: str):
  for key in path.split("."):
    config = config[key]
  return config


def check_image_size(config: ml_collections.ConfigDict) -> None:
  """The image must halve `depth` times (the U-Net; Slot Attention's decoder
  doubles `decoder_upsamplings` times): say so, with the nearest sizes that do."""
  from clevr_jax import models  # pylint: disable=g-import-not-at-top  (JAX, no TensorFlow)
  factor, field = models.size_factor(config)
  for name in ("image_height", "image_width"):
    size = config.data[name]
    if size % factor == 0 and size > 0:
      continue
    lower, upper = max(size // factor * factor, factor), (size // factor + 1) * factor
    nearest = sorted({lower, upper}, key=lambda v: (abs(v - size), v))
    raise ValueError(
        f"config.data.{name}={size} is not divisible by {factor} (the network halves it "
        f"{factor.bit_length() - 1} times, {field}): use "
        f"--config.data.{name}={nearest[0]}"
        + (f" (or {nearest[1]})" if len(nearest) > 1 else ""))


def check_region_slots(config: ml_collections.ConfigDict) -> None:
  """R (eval.max_regions) must hold a post-processing segmenter's clusters: with
  fewer slots than clusters, every image would lose regions before the merge."""
  from clevr_jax.segmentation import segmenters  # pylint: disable=g-import-not-at-top  (JAX)
  ev = config.eval
  names = dict.fromkeys(tuple(ev.segmenter_names) + (ev.user_segmenter,))
  for name in (n for n in names if n in ev.segmenters):
    segmenter = segmenters.from_config(name, ev.segmenters[name], ev.kmeans.fixed_k)
    if segmenter.post_processes and ev.max_regions < segmenter.k_max:
      raise ValueError(
          f"config.eval.max_regions={ev.max_regions} region slots are fewer than the "
          f"{segmenter.k_max} clusters segmenter {name!r} splits into regions: every "
          f"image would lose regions; set --config.eval.max_regions={segmenter.k_max} "
          "or more (the default, 128, holds the scenes measured: 24-34 regions)")


def check_mode_flags(mode: str, workdirs: Sequence[str], images: Sequence[str]) -> None:
  """The flags a mode cannot run without."""
  if mode == "report" and not workdirs:
    raise ValueError("--mode=report needs --workdirs=A,B,...")
  if mode == "segment" and not images:
    raise ValueError("--mode=segment needs --images=FILE_OR_DIR[,...]")


def check_config(config: ml_collections.ConfigDict, mode: str,
                 devices: tuple[int, int] | None = None) -> None:
  """Everything `mode` reads from `config`, checked once, before any work.

  Args:
    config: the resolved config.
    mode: one of main's modes.
    devices: (process count, local device count) for the modes that run
      batches over the devices; None for those that do not.
  """
  for path in _POSITIVE:
    if _get(config, path) <= 0:
      raise ValueError(f"config.{path}={_get(config, path)} must be at least 1: set "
                       f"--config.{path}=N with N >= 1")
  for path in _NON_NEGATIVE:
    if _get(config, path) < 0:
      raise ValueError(f"config.{path}={_get(config, path)} must be 0 or more")
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}: choose one of {TASKS}")
  from clevr_jax import models  # pylint: disable=g-import-not-at-top
  if config.task == "segmentation" and models.architecture(config) == "slot_attention":
    raise ValueError("config.model.architecture='slot_attention' is trained by "
                     "reconstruction: use --config.task=reconstruction")
  if config.task == "segmentation" and config.loss.weighted:
    raise ValueError("config.loss.weighted applies to task='reconstruction' only: set "
                     "--config.loss.weighted=False")
  if mode in ("prepare", "train", "evaluate"):  # the network's modes
    check_image_size(config)
  if mode in ("train", "evaluate"):
    from clevr_jax.objects import objectives  # pylint: disable=g-import-not-at-top  (imports JAX)
    objectives.check_config(config)
  if mode in ("train", "evaluate", "baselines", "segment"):
    check_region_slots(config)
  if devices is not None and mode in _BATCHES:
    from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
    for path in _BATCHES[mode]:
      pipeline.per_device_batch(_get(config, path), *devices, flag=f"--config.{path}")
