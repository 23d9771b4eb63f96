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
import math
import os
from typing import Sequence

import ml_collections

from clevr_jax.segmentation import spec as segmenter_spec

TASKS = ("reconstruction", "segmentation")
SCHEDULES = ("constant", "cosine", "warmup_exponential")
# Settings that count something: 0 or less would divide by zero or never happen.
_POSITIVE = ("batch_size", "eval.batch_size", "num_epochs", "log_every_steps",
             "checkpoint_every_steps", "keep_checkpoints", "model.base_width", "model.depth",
             "eval.kmeans.num_restarts", "eval.kmeans.max_iter", "eval.max_regions")
_NON_NEGATIVE = ("num_train_steps", "eval.max_images", "eval.num_figure_images", "num_preview_images",
                 "optimizer.warmup_steps", "data.eval_file_height", "data.eval_file_width",
                 "objectives.self_training_rounds", "objectives.pseudo_masks.round")
# The other numeric settings' ranges, as intervals ('[' and ']' include the end).
_RANGES = {
    "data.prefetch_batches": "[0, inf)", "data.synthetic.num_train": "[1, inf)",
    "data.synthetic.num_test": "[1, inf)", "data.synthetic.height": "[0, inf)",
    "data.synthetic.width": "[0, inf)", "data.synthetic.cube_scale": "(0, inf)",
    "data.synthetic.shadow_lights": "[1, 3]", "data.synthetic.sun_share": "[0, 1]",
    "data.synthetic.contact_occlusion": "[0, 1]", "data.synthetic.contact_reach": "(0, inf)",
    "data.synthetic.zoom": "(0, inf)",
    "model.dropout_rate": "[0, 1)", "model.bn_momentum": "[0, 1]",
    "model.attention_blocks": "[0, inf)", "model.attention_heads": "[1, inf)",
    "model.attention_mlp_ratio": "(0, inf)", "model.embedding_dim": "[0, inf)",
    "model.slot_attention.num_slots": "[1, inf)", "model.slot_attention.num_iterations": "[1, inf)",
    "model.slot_attention.slot_size": "[1, inf)", "model.slot_attention.mlp_hidden": "[1, inf)",
    "model.slot_attention.epsilon": "(0, inf)", "model.slot_attention.scale": "[0, inf)",
    "model.slot_attention.encoder_features": "[1, inf)",
    "model.slot_attention.encoder_kernel": "[1, inf)",
    "model.slot_attention.decoder_features": "[1, inf)",
    "model.slot_attention.decoder_upsamplings": "[0, inf)",
    "model.slot_attention.decoder_layers": "[0, inf)",
    "model.slot_attention.decoder_kernel": "[1, inf)",
    "model.slot_attention.kmeans_iterations": "[1, inf)",
    "optimizer.grad_clip_norm": "[0, inf)",
    "optimizer.learning_rate": "(0, inf)", "optimizer.weight_decay": "[0, inf)",
    "optimizer.b1": "[0, 1)", "optimizer.b2": "[0, 1)", "optimizer.eps": "(0, inf)",
    "optimizer.decay_rate": "(0, inf)", "optimizer.decay_steps": "[1, inf)",
    "eval.kmeans.tol": "[0, inf)", "eval.progress_every_s": "[0, inf)",
    "objectives.discriminative.delta_v": "[0, inf)",
    "objectives.discriminative.delta_d": "[0, inf)",
    "objectives.discriminative.var_weight": "[0, inf)",
    "objectives.discriminative.dist_weight": "[0, inf)",
    "objectives.discriminative.reg_weight": "[0, inf)",
    "objectives.mask_infonce.num_pixel_queries": "[1, inf)",
    "objectives.view_infonce.num_points": "[1, inf)",
    "objectives.view_infonce.exclude_radius": "[0, inf)",
    "objectives.views.min_scale": "(0, 1]", "objectives.views.max_scale": "(0, 1]",
    "objectives.views.min_aspect": "(0, inf)", "objectives.views.max_aspect": "(0, inf)",
    "objectives.views.flip_prob": "[0, 1]", "objectives.pseudo_masks.max_labels": "[1, 255]",
    "objectives.pseudo_masks.min_purity": "[0, 1]",
}
# Settings that name one of a few choices: the attribute of clevr_jax.models.slot_attention
# that lists them.
_CHOICES = {"model.slot_attention.update_rule": "UPDATES", "model.slot_attention.init": "INITS"}
# R, the region slots: the merge holds an R x R distance matrix per image on the
# device (4 MiB of float32 at this bound, and its compile time grows with R). The
# scenes measured have 24-34 regions after absorbing specks.
MAX_REGION_SLOTS = 1024
# The modes that run batches over the devices, and the batches each one runs.
_BATCHES = {"train": ("batch_size", "eval.batch_size"), "evaluate": ("eval.batch_size",),
            "baselines": ("eval.batch_size",), "score_features": ("eval.batch_size",),
            "score_masks": ("eval.batch_size",)}


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


def _numbers(value) -> list:
  """The numbers of a setting (a tuple's elements too); booleans are no numbers."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_numbers(config: ml_collections.ConfigDict) -> None:
  """Every numeric setting is finite, and in its range where it has one: NaN
  compares false with everything, so a NaN threshold would pass any `<` check
  below it and silently change what runs."""
  for path in _leaves(config):
    for number in _numbers(_get(config, path)):
      if not math.isfinite(number):
        raise ValueError(f"config.{path}={_get(config, path)} must be a finite number")
  for path, interval in _RANGES.items():
    try:
      value = _get(config, path)
    except KeyError:  # a config without that part (e.g. no slot_attention)
      continue
    if not all(segmenter_spec.in_interval(v, interval) for v in _numbers(value)):
      raise ValueError(f"config.{path}={value} must be in {interval}: set --config.{path}")
  from clevr_jax.models import slot_attention  # pylint: disable=g-import-not-at-top  (JAX)
  for path, name in _CHOICES.items():
    try:
      value = _get(config, path)
    except KeyError:
      continue
    choices = getattr(slot_attention, name)
    if value not in choices:
      raise ValueError(f"config.{path}={value!r} is not one of {', '.join(map(repr, choices))}: "
                       f"set --config.{path}={choices[0]}")
  if (config.data.eval_file_height > 0) != (config.data.eval_file_width > 0):
    raise ValueError("config.data.eval_file_height and eval_file_width are given together "
                     f"(now {config.data.eval_file_height} and {config.data.eval_file_width}): "
                     "set both, or both to 0")
  if config.eval.max_regions > MAX_REGION_SLOTS:
    raise ValueError(f"config.eval.max_regions={config.eval.max_regions} is more than "
                     f"{MAX_REGION_SLOTS}: the merge holds an R x R matrix per image; the "
                     "scenes measured have 24-34 regions (the default, 128, holds them)")


def _segmenter(config: ml_collections.ConfigDict, name: str, field: str
               ) -> segmenter_spec.Segmenter:
  """The segmenter `name` that `field` names, built and checked by its schema
  (`segmenter_spec.Segmenter.check`; names the field if it is not defined)."""
  ev = config.eval
  if name not in ev.segmenters:
    raise ValueError(f"config.{field} names {name!r}, which config.eval.segmenters does not "
                     f"define (defined: {', '.join(sorted(ev.segmenters.keys()))})")
  segmenter = segmenter_spec.from_config(name, ev.segmenters[name])
  segmenter.check()
  return segmenter


def check_names(config: ml_collections.ConfigDict, mode: str) -> None:
  """Every segmenter and tap a mode runs is defined, before any work: a name the
  network lacks would otherwise stop the run after training."""
  ev = config.eval
  if mode in ("train", "evaluate", "baselines", "score_features"):
    if not ev.segmenter_names:
      raise ValueError("config.eval.segmenter_names is empty: name at least one of "
                       f"config.eval.segmenters ({', '.join(sorted(ev.segmenters.keys()))}), "
                       "e.g. --config.eval.segmenter_names=\"('kmeans',)\"")
    for name in ev.segmenter_names:
      _segmenter(config, name, "eval.segmenter_names")
  if mode == "segment":
    _segmenter(config, ev.user_segmenter, "eval.user_segmenter")
  if mode not in ("train", "evaluate"):
    return
  from clevr_jax import models  # pylint: disable=g-import-not-at-top  (JAX)
  valid = models.config_tap_names(config)
  if not ev.taps:
    raise ValueError(f"config.eval.taps is empty: name at least one tap of this network "
                     f"({', '.join(valid)})")
  hypercolumn_taps = [t for spec in ev.hypercolumns for t in spec.split("+")]
  bad = [t for t in tuple(ev.taps) + tuple(hypercolumn_taps) if t not in valid]
  if bad:
    raise ValueError(f"config.eval.taps (or eval.hypercolumns) names {bad}, which this "
                     f"network does not have: its taps are {', '.join(valid)}")
  if models.architecture(config) == "slot_attention":
    slots = config.model.slot_attention.num_slots
    for name in ev.segmenter_names:
      segmenter = _segmenter(config, name, "eval.segmenter_names")
      if segmenter.cluster == "argmax" and slots > segmenter.k_max:
        raise ValueError(
            f"config.model.slot_attention.num_slots={slots} is more than the "
            f"{segmenter.k_max} labels segmenter {name!r} counts: set "
            f"--config.eval.segmenters.{name}.num_clusters={slots}")


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
  ev = config.eval
  names = dict.fromkeys(tuple(ev.segmenter_names) + (ev.user_segmenter,))
  for name in (n for n in names if n in ev.segmenters):
    segmenter = segmenter_spec.from_config(name, ev.segmenters[name])
    if segmenter.post_processes and ev.max_regions < segmenter.k_max:
      raise ValueError(
          f"config.eval.max_regions={ev.max_regions} region slots are fewer than the "
          f"{segmenter.k_max} clusters segmenter {name!r} splits into regions: every "
          f"image would lose regions; set --config.eval.max_regions={segmenter.k_max} "
          "or more (the default, 128, holds the scenes measured: 24-34 regions)")


def check_self_training(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """The pseudo-masks and self-training rounds a training run uses, before it
  trains: the segmenter that makes the masks predicts K (training images have no
  labels), a round's segmenter reads the image, and a round's teacher has a
  checkpoint and is not the run's own workdir (resuming its teacher's finished
  checkpoint, the round would train no step and report the teacher's network)."""
  from clevr_jax.objects import objectives  # pylint: disable=g-import-not-at-top  (JAX)
  obj = config.objectives
  pm, rounds = obj.pseudo_masks, obj.self_training_rounds
  if rounds and not objectives.needs_pseudo_masks(config):
    raise ValueError(f"config.objectives.self_training_rounds={rounds}: no objective uses "
                     "pseudo-masks (e.g. --config.objectives.discriminative.weight=1)")
  if not objectives.needs_pseudo_masks(config):
    return
  from clevr_jax import models  # pylint: disable=g-import-not-at-top  (JAX)
  if obj.tap not in models.config_tap_names(config):
    raise ValueError(f"config.objectives.tap={obj.tap!r} is not a tap of this network: "
                     f"choose one of {', '.join(models.config_tap_names(config))}")
  if pm.cache_dir:  # a file there, or no permission, fails now rather than after the data
    from clevr_jax import guards  # pylint: disable=g-import-not-at-top
    guards.check_writable(os.path.expanduser(pm.cache_dir),
                          "--config.objectives.pseudo_masks.cache_dir")
  fields = ["segmenter" if pm.round == 0 else "round_segmenter"]
  if pm.round == 0 and rounds:
    fields.append("round_segmenter")
  for field in fields:
    name = pm[field]
    segmenter = _segmenter(config, name, f"objectives.pseudo_masks.{field}")
    if not segmenter.predicts_k:
      raise ValueError(f"config.objectives.pseudo_masks.{field}={name!r} takes K from the "
                       "labels (k='oracle' or 'fixed'): pseudo-masks must use none; choose a "
                       "segmenter with k='predict', e.g. 'split_merge_predict_k'")
    if field == "round_segmenter" and not segmenter.uses_pixels:
      raise ValueError(f"config.objectives.pseudo_masks.round_segmenter={name!r} does not "
                       "read the image: self-training rounds use a hybrid (split_source="
                       "'pixels'), e.g. 'hybrid_predict_k'")
  if pm.round == 0:
    return
  if workdir is not None and "://" not in workdir:
    teacher = os.path.realpath(os.path.expanduser(pm.teacher_workdir))
    if teacher == os.path.realpath(workdir):
      raise ValueError(
          f"config.objectives.pseudo_masks.teacher_workdir={pm.teacher_workdir} is this "
          f"run's own --workdir: round {pm.round} would resume its teacher's checkpoint "
          "instead of training; give the round its own --workdir")
  from clevr_jax.training import checkpoints  # pylint: disable=g-import-not-at-top  (JAX)
  if not checkpoints.has_checkpoint(pm.teacher_workdir):
    raise ValueError(f"config.objectives.pseudo_masks.round={pm.round} needs the previous "
                     "round's network: set --config.objectives.pseudo_masks.teacher_workdir "
                     f"to a workdir with a checkpoint (now {pm.teacher_workdir!r}), or chain "
                     "rounds with --config.objectives.self_training_rounds=N")


def check_mode_flags(mode: str, workdirs: Sequence[str], images: Sequence[str],
                     features: str | None = None, masks: str | None = None) -> None:
  """The flags a mode cannot run without."""
  if mode == "report" and not workdirs:
    raise ValueError("--mode=report needs --workdirs=A,B,...")
  if mode == "segment" and not images:
    raise ValueError("--mode=segment needs --images=FILE_OR_DIR[,...]")
  if mode == "score_features" and not features:
    raise ValueError("--mode=score_features needs --features=FOLDER (one <index>.npy per test "
                     "image, or .npz shards; or a folder of such folders)")
  if mode == "score_masks" and not masks:
    raise ValueError("--mode=score_masks needs --masks=FOLDER (one <index>.npy or <index>.png "
                     "label map per test image)")


def check_config(config: ml_collections.ConfigDict, mode: str,
                 devices: tuple[int, int] | None = None, workdir: str | None = None) -> None:
  """Everything `mode` reads from `config`, checked once, before any work.

  Args:
    config: the resolved config.
    mode: one of main's modes.
    devices: (process count, local device count) for the modes that run
      batches over the devices; None for those that do not.
    workdir: the run's --workdir (a self-training round's teacher must be another).
  """
  for path in _POSITIVE:
    if _get(config, path) <= 0:
      raise ValueError(f"config.{path}={_get(config, path)} must be at least 1: set "
                       f"--config.{path}=N with N >= 1")
  for path in _NON_NEGATIVE:
    if _get(config, path) < 0:
      raise ValueError(f"config.{path}={_get(config, path)} must be 0 or more")
  check_numbers(config)
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}: choose one of {TASKS}")
  if config.optimizer.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={config.optimizer.schedule!r}: use "
                     "'constant', 'cosine' or 'warmup_exponential'")
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
  if mode == "train":
    check_self_training(config, workdir)
  if mode in ("train", "evaluate", "baselines", "segment", "score_features"):
    check_names(config, mode)
    check_region_slots(config)
  if devices is not None and mode in _BATCHES:
    from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
    for path in _BATCHES[mode]:
      pipeline.per_device_batch(_get(config, path), *devices, flag=f"--config.{path}")
