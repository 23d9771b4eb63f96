"""Pseudo-masks and self-training rounds: the masks the object-aware objectives
train on, and the rounds that re-make them from the previous round's network.

Round 0 trains on masks of a raw-pixel segmenter (`pseudo_masks.segmenter`);
round n >= 1 on masks of `pseudo_masks.round_segmenter`, a hybrid that splits by
the image and merges by round n-1's network's tap `objectives.tap` (its
teacher). `rounds` chains them after a run's own training: round n trains from
scratch in <workdir>/round<n>. The settings are checked once, by
`validate.check_self_training`.
"""

from __future__ import annotations

from collections.abc import Callable
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from clevr_jax import logs
from clevr_jax import sharding
from clevr_jax.data import pipeline
from clevr_jax.objects import objectives
from clevr_jax.objects import pseudo_masks
from clevr_jax.training import batch as batch_lib
from clevr_jax.training import checkpoints
from clevr_jax.training import train_step as train_step_lib


def teacher_tap(config: ml_collections.ConfigDict
                ) -> tuple[Callable[[np.ndarray], jax.Array] | None, str]:
  """From self-training round 1 on: (images -> the teacher's tap `objectives.tap`,
  the teacher's identity for the cache key: its checkpoint's path and step);
  (None, '') in round 0."""
  pm = config.objectives.pseudo_masks
  if pm.round == 0:
    return None, ""
  teacher = os.path.abspath(os.path.expanduser(pm.teacher_workdir))
  try:
    state, model = checkpoints.restore_model(config, teacher, sharding.make_mesh())
  except checkpoints.ArchitectureMismatch as e:
    raise ValueError(
        f"the teacher of round {pm.round}, config.objectives.pseudo_masks.teacher_workdir="
        f"{pm.teacher_workdir}, holds another network than this round builds: "
        f"{e.differences}. A round's teacher is the previous round's network, of the same "
        "config.model.*: set teacher_workdir to such a run, or run the model settings the "
        "teacher was trained with") from None
  tap = config.objectives.tap
  predict = train_step_lib.make_predict_fn(model, (tap,))
  step = int(jax.device_get(state.step))
  return (lambda images: predict(state, images)[1][tap]), f"{teacher}@{step}"


def rounds(config: ml_collections.ConfigDict, workdir: str
           ) -> list[tuple[ml_collections.ConfigDict, str]]:
  """(config, workdir) of each round a run chains after its own
  (`objectives.self_training_rounds`): round n in <workdir>/round<n>, trained
  from scratch on masks of the round segmenter run on round n-1's network."""
  chain, teacher = [], workdir
  for n in range(1, config.objectives.self_training_rounds + 1):
    round_config = config.copy_and_resolve_references()
    round_config.objectives.pseudo_masks.round = n
    round_config.objectives.pseudo_masks.teacher_workdir = teacher
    round_config.objectives.self_training_rounds = 0
    teacher = os.path.join(workdir, f"round{n}")
    chain.append((round_config, teacher))
  return chain


def load_pseudo_masks(config: ml_collections.ConfigDict, workdir: str,
                      train_split: pipeline.Split) -> pseudo_masks.PseudoMaskStore | None:
  """The training images' pseudo-instance masks when an objective uses them:
  process 0 computes them once (or finds them cached), every process loads them."""
  if not objectives.needs_pseudo_masks(config):
    return None
  path = pseudo_masks.cache_path(config, workdir)
  tap_fn, teacher = teacher_tap(config)
  key = pseudo_masks.fingerprint(config, teacher)
  derive = batch_lib.make_derive(config)

  def batches():
    for host_batch in train_split.eval_batches(fields=("image", "valid", "index")):
      yield {k: np.asarray(v) for k, v in derive(host_batch).items()}

  def compute():
    start = time.time()
    progress = logs.Progress("pseudo-masks", train_split.num_examples,
                             config.eval.progress_every_s)
    store = pseudo_masks.load_or_compute(
        path, batches, pseudo_masks.make_segmenter(config, tap_fn), key, progress.update)
    logging.info("Pseudo-masks of %d training images ready (%s, %.0f s)", len(store), path,
                 time.time() - start)
    return store

  store = compute() if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("pseudo-masks written")
    if store is None:  # written by process 0: read, not computed again
      store = pseudo_masks.load_or_compute(
          path, batches, pseudo_masks.make_segmenter(config, tap_fn), key)
  return store
