"""Scoring a trained checkpoint: restore, tap features, every segmenter, figures."""

from __future__ import annotations

from typing import Any

from absl import logging
import jax
import ml_collections

from clevr_jax import models
from clevr_jax import plots
from clevr_jax import sharding
from clevr_jax.evaluation import protocol
from clevr_jax.evaluation import results as results_lib
from clevr_jax.evaluation import supervised
from clevr_jax.segmentation import segmenters as segmenters_lib
from clevr_jax.segmentation import transforms
from clevr_jax.training import checkpoints
from clevr_jax.training import state as state_lib
from clevr_jax.training import train_step

HYPERCOLUMN_SEP = "+"


def scored_taps(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(the network taps to compute, the feature maps to score: taps, then hypercolumns)."""
  valid = models.config_tap_names(config)
  hypercolumns = tuple(config.eval.hypercolumns)
  needed = list(config.eval.taps)
  for spec in hypercolumns:
    for tap in spec.split(HYPERCOLUMN_SEP):
      if tap not in valid:
        raise ValueError(f"eval.hypercolumns: {tap!r} in {spec!r} is not a tap of this "
                         f"network ({list(valid)})")
      if tap not in needed:
        needed.append(tap)
  bad = [t for t in config.eval.taps if t not in valid]
  if bad:
    raise ValueError(f"eval.taps: {bad} are not taps of this network ({list(valid)})")
  return tuple(needed), tuple(config.eval.taps) + hypercolumns


def tap_features_fn(state: state_lib.TrainState, model: models.UNet, config: ml_collections.ConfigDict
                    ) -> protocol.FeaturesFn:
  needed, _ = scored_taps(config)
  predict = train_step.make_predict_fn(model, needed)

  def features(batch):
    taps = dict(predict(state, batch["image"])[1])
    for spec in config.eval.hypercolumns:
      taps[spec] = transforms.hypercolumn([taps[t] for t in spec.split(HYPERCOLUMN_SEP)])
    return taps

  return features


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores the newest checkpoint of `workdir`; writes results and figures there."""
  from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  segmenters = segmenters_lib.configured(config)
  mesh = sharding.make_mesh()
  split = pipeline.Split(config, "test")
  state, model = checkpoints.restore_model(config, workdir, mesh)
  step = int(jax.device_get(state.step))
  count = protocol.num_images(config, split)
  logging.info("Evaluating %s at step %d on %d test images", config.name, step, count)
  results: dict[str, Any] = {
      "name": config.name, "checkpoint_step": step, "config": config.to_dict(),
      "num_images": count}
  if config.task == "segmentation":
    results["supervised"], first = supervised.score(config, state, model, split, mesh)
    if jax.process_index() == 0:
      plots.save_supervised_figures(workdir, results["supervised"], first)
  else:
    _, scored = scored_taps(config)
    results["segmenters"], first = protocol.score_features(
        config, mesh, tap_features_fn(state, model, config), scored, split, segmenters,
        keep_first=config.eval.num_figure_images)
    results["segmenter_specs"] = {s.name: results_lib.spec_dict(s) for s in segmenters}
    if jax.process_index() == 0:
      plots.save_tap_figures(workdir, results["segmenters"], first, scored)
  if jax.process_index() == 0:
    results_lib.write_results(workdir, results)
  return results
