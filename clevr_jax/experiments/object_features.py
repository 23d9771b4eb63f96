"""Prototype of issue 10's experiment outside the train loop: train the U-Net
with reconstruction plus the object-aware terms of `config.objectives` on one
device, then score taps with the poster's K-Means (oracle K) against raw
pixels, and the stand-in pseudo-mask segmenter (no oracle) as the raw-pixel
post-processed reference.

  python -m clevr_jax.experiments.object_features \
      --config=configs/unet_objects.py:experiment --workdir=runs/objects_exp \
      --max_steps=600 [--config.objectives.view_infonce.weight=0 ...]

Writes <workdir>/results.json and prints a table. A stop-gap until the train
step calls `objectives.objective_terms` (notes: issue10_integration.md).
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from clevr_jax import kmeans
from clevr_jax import losses
from clevr_jax import metrics
from clevr_jax import objectives
from clevr_jax import pseudo_masks
from clevr_jax import schema
from clevr_jax import batch as batch_lib
from clevr_jax import state as state_lib
from clevr_jax.data import pipeline

config_flags.DEFINE_config_file("config", None, "A configs/*.py file with ':preset'.")
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_integer("max_steps", 0, "Stop training after this many steps (0: the schedule).")
flags.DEFINE_integer("eval_images", 0, "Test images to score (0: all).")
flags.DEFINE_list("taps", ["input", "enc1", "dec3", "dec4", "output", "embedding"],
                  "Taps to score with K-Means.")
FLAGS = flags.FLAGS


def _decoded(batch: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """A pipeline batch (stored uint8 fields) as host arrays with the derived names
  (image in [0, 1], instance_labels, num_masks, ...): the steps' own `derive`."""
  return {k: np.asarray(v) for k, v in batch_lib.derive(batch, config).items()}


def make_train_step(config, model, tx):
  taps = objectives.required_taps(config)

  def train_step(state, batch, key):
    images, extra = objectives.prepare_views(config, key, batch)
    names = list(images)
    n = batch["image"].shape[0]
    x = jnp.concatenate([images[v] for v in names])  # one pass: shared BatchNorm stats

    def loss_fn(params):
      (out, tap_values), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          mutable=["batch_stats"], taps=taps)
      recon = losses.mse(out, x)
      by_view = {v: {t: a[i * n:(i + 1) * n] for t, a in tap_values.items()}
                 for i, v in enumerate(names)}
      terms = objectives.objective_terms(config, by_view, batch | extra, None, key)
      return recon + terms["total"], (updates["batch_stats"], terms, recon)

    (loss, (batch_stats, terms, recon)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state)
    return state, {"loss": loss, "recon": recon, **terms}

  return jax.jit(train_step, donate_argnums=(0,))


def train(config, workdir):
  train_split = pipeline.Split(config, "train")
  store = None
  if objectives.needs_pseudo_masks(config):
    start = time.time()
    store = pseudo_masks.load_or_compute(
        pseudo_masks.cache_path(config, workdir),
        lambda: (_decoded(b, config) for b in train_split.eval_batches()),
        pseudo_masks.make_segmenter(config), pseudo_masks.fingerprint(config))
    logging.info("pseudo-masks of %d images ready in %.1f s", len(store), time.time() - start)
  steps_per_epoch = train_split.steps_per_epoch(config.batch_size)
  total = config.num_epochs * steps_per_epoch
  if FLAGS.max_steps:
    total = min(total, FLAGS.max_steps)
  model = state_lib.make_model(config)
  tx = state_lib.make_optimizer(config, total)
  state = state_lib.create_state(config, tx)
  step_fn = make_train_step(config, model, tx)
  key = jax.random.key(config.seed + 1)
  step, start, log = 0, time.time(), []
  for epoch in range(config.num_epochs):
    for host_batch in train_split.train_batches(epoch, fields=("image", "valid", "index")):
      batch = _decoded(host_batch, config)
      if store is not None:
        batch = pseudo_masks.add_to_batch(batch, store)
      batch = {k: batch[k] for k in ("image", "valid", "index", "pseudo_labels") if k in batch}
      state, values = step_fn(state, batch, jax.random.fold_in(key, step))
      step += 1
      if step % config.log_every_steps == 0 or step == total:
        values = {k: float(v) for k, v in values.items()}
        values.update(step=step, seconds=time.time() - start)
        log.append(values)
        logging.info("step %d/%d %s", step, total,
                     " ".join(f"{k}={v:.4f}" for k, v in values.items()))
      if step >= total:
        return state, model, log
  return state, model, log


def evaluate(config, state, model, taps, max_images):
  split = pipeline.Split(config, "test")
  k_max = schema.MAX_SLOTS
  predict = state_lib.make_predict_fn(model, tuple(t for t in taps if t != "input"))
  km = config.eval.kmeans
  height, width = config.data.image_height, config.data.image_width

  @functools.partial(jax.jit, static_argnames="metric")
  def cluster(features, k, keys, metric):
    b, h, w, c = features.shape
    result = kmeans.kmeans(features.reshape(b, h * w, c), k, keys, k_max=k_max,
                           num_restarts=km.num_restarts, max_iter=km.max_iter, tol=km.tol,
                           metric=metric, init=km.init)
    return kmeans.upsample_labels(result.labels.reshape(b, h, w), height, width)

  names = [(t, m) for t in taps for m in ("cosine", "euclidean")]
  acc = {n: metrics.MeanAccumulator() for n in names + [("stand_in_pixels", "no_oracle")]}
  segmenter = pseudo_masks.make_segmenter(config)
  for host_batch in split.eval_batches(max_examples=max_images):
    batch = _decoded(host_batch, config)
    features = dict(predict(state, jnp.asarray(batch["image"]))[1])
    features["input"] = jnp.asarray(batch["image"])
    base = jax.random.key(config.seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(
        jnp.asarray(batch["index"]).astype(jnp.uint32))
    k = jnp.asarray(batch["num_masks"])
    for tap, metric in names:
      labels = np.asarray(cluster(features[tap], k, keys, metric))
      acc[tap, metric].add(metrics.score_instances(
          batch["instance_labels"], labels, batch["num_masks"], batch["valid"],
          num_true_slots=schema.MAX_SLOTS, num_pred_slots=k_max))
    stand_in = segmenter(batch["image"])
    acc["stand_in_pixels", "no_oracle"].add(metrics.score_instances(
        batch["instance_labels"], np.minimum(stand_in, 255), batch["num_masks"],
        batch["valid"], num_true_slots=schema.MAX_SLOTS,
        num_pred_slots=int(config.objectives.pseudo_masks.max_labels)))
  return {f"{t}/{m}": a.result() for (t, m), a in acc.items()}


def main(argv):
  del argv
  config = FLAGS.config
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  objectives.check_config(config)
  pipeline.prepare(config)
  start = time.time()
  state, model, log = train(config, workdir)
  train_seconds = time.time() - start
  taps = [t for t in FLAGS.taps if t != "embedding" or config.model.embedding_dim > 0]
  scores = evaluate(config, state, model, taps, FLAGS.eval_images)
  results = {"config": config.to_dict(), "train_seconds": train_seconds, "log": log,
             "scores": scores}
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=float)
  lines = ["| features / K-Means metric | poster mIoU | FG-ARI | ClevrTex mIoU |", "|---|---|---|---|"]
  for name, s in scores.items():
    lines.append(f"| {name} | {s['poster_miou']:.3f} | {s['fg_ari']:.3f} | "
                 f"{s['clevrtex_miou']:.3f} |")
  print("\n".join(lines))
  logging.info("trained %.0f s; results in %s/results.json\n%s", train_seconds, workdir,
               "\n".join(lines))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
