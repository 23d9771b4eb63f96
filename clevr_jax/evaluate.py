"""Segmentation by clustering, scored: restore, tap, cluster, match, report.

For every test image and every tap, the tap's features are clustered with
K-Means at the tap's own resolution and the labels upsampled (nearest) to the
image: the same minimisers as clustering the upsampled map (see kmeans.py).
Each image is clustered twice: with the oracle K (its number of true masks,
background included: the poster's protocol) and with a fixed K (the honest
setting). The clusters are scored as instance masks (metrics.py).

K-Means and the contingency tables run on the devices, each device clustering
its own images; the label maps are gathered to the host, where the Hungarian
matching runs. Padding examples are scored as invalid, so the dataset figures
equal a single-process run's however many processes share the work.
"""

from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from clevr_jax import checkpoints
from clevr_jax import kmeans
from clevr_jax import metrics
from clevr_jax import models
from clevr_jax import plots
from clevr_jax import batch as batch_lib
from clevr_jax import state as state_lib

if TYPE_CHECKING:  # imported where a split is read: the scoring itself is TF-free
  from clevr_jax.data import pipeline
from clevr_jax import schema

K_MODES = ("oracle_k", "fixed_k")


def k_max(config: ml_collections.ConfigDict) -> int:
  return max(schema.MAX_SLOTS, config.eval.kmeans.fixed_k)


def make_cluster_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    *, metric: str | None = None
                    ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """(features [B, h, w, c], K [B], keys [B]) -> labels [B, H, W], per device.

  Keys are per image (folded from the example's index), so an image's
  clusters do not depend on which device, or how many, cluster it.
  """
  km = config.eval.kmeans
  height, width = config.data.image_height, config.data.image_width

  def cluster(features, num_clusters, keys):
    b, h, w, c = features.shape
    result = kmeans.kmeans(
        features.reshape(b, h * w, c), num_clusters, keys, k_max=k_max(config),
        num_restarts=km.num_restarts, max_iter=km.max_iter, tol=km.tol,
        metric=metric or km.metric, init=km.init)
    return kmeans.upsample_labels(result.labels.reshape(b, h, w), height, width)

  # Each device clusters its own images, with no collective: the varying-axis
  # type check (which K-Means' loop carries would need annotating for) adds nothing.
  return jax.jit(jax.shard_map(cluster, mesh=mesh, in_specs=P(state_lib.AXIS),
                               out_specs=P(state_lib.AXIS), check_vma=False))


def image_keys(seed: int, index: jax.Array) -> jax.Array:
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(index.astype(jnp.uint32))


def _score(accumulator: metrics.MeanAccumulator, labels: np.ndarray,
           batch: dict[str, np.ndarray], num_pred_slots: int) -> metrics.InstanceScores:
  scores = metrics.score_instances(
      batch["instance_labels"], labels, batch["num_masks"], batch["valid"],
      num_true_slots=schema.MAX_SLOTS, num_pred_slots=num_pred_slots)
  accumulator.add(scores)
  return scores


def _host_batches(config: ml_collections.ConfigDict, split: pipeline.Split,
                  mesh: jax.sharding.Mesh
                  ) -> Iterable[tuple[dict[str, jax.Array], dict[str, np.ndarray]]]:
  """(global device batch, the same batch whole on the host) over the test split."""
  derive = batch_lib.make_derive(config)
  for host_batch in split.eval_batches(
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_examples=config.eval.max_images, fields=batch_lib.fields(config, "evaluate")):
    batch = derive(batch_lib.to_global(host_batch, mesh))
    whole = {k: state_lib.to_host(batch[k]) for k in
             ("image", "instance_labels", "num_masks", "semantic", "valid", "index")}
    yield batch, whole


def _fixed_k(batch: dict[str, jax.Array], k: int) -> jax.Array:
  return jnp.full_like(batch["num_masks"], k)


def cluster_and_score(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      features_fn: Callable[[dict[str, jax.Array]], dict[str, jax.Array]],
                      names: tuple[str, ...], split: pipeline.Split, *,
                      metric: str | None = None, keep_first: int = 0
                      ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
  """Scores the clusters of each named feature map over the test split.

  Returns ({name: {k_mode: {metric: mean}}}, the first batch's images, truth,
  features and oracle-K labels, for figures).
  """
  cluster = make_cluster_fn(config, mesh, metric=metric)
  accumulators = {(n, m): metrics.MeanAccumulator() for n in names for m in K_MODES}
  first: dict[str, Any] = {}
  for batch, whole in _host_batches(config, split, mesh):
    keys = image_keys(config.seed, batch["index"])
    features = features_fn(batch)
    for name in names:
      for mode in K_MODES:
        k = batch["num_masks"] if mode == "oracle_k" else _fixed_k(
            batch, config.eval.kmeans.fixed_k)
        labels = state_lib.to_host(cluster(features[name], k, keys))
        scores = _score(accumulators[name, mode], labels, whole, k_max(config))
        if keep_first and not first.get("done") and mode == "oracle_k":
          first.setdefault("labels", {})[name] = labels[:keep_first]
          first.setdefault("scores", {})[name] = scores
          first.setdefault("features", {})[name] = state_lib.to_host(features[name])[:keep_first]
    if keep_first and not first.get("done"):
      first.update({k: whole[k][:keep_first] for k in whole}, done=True)
  table = {n: {m: accumulators[n, m].result() for m in K_MODES} for n in names}
  return table, first


def _tap_features_fn(state, model, taps):
  predict = state_lib.make_predict_fn(model, taps)
  return lambda batch: predict(state, batch["image"])[1]


def restore_state(config: ml_collections.ConfigDict, workdir: str,
                  mesh: jax.sharding.Mesh) -> tuple[state_lib.TrainState, models.UNet]:
  manager = checkpoints.make_manager(workdir, read_only=True)
  return (checkpoints.restore(manager, state_lib.abstract_state(config), mesh),
          state_lib.make_model(config))


def _supervised(config, state, model, split, mesh) -> tuple[dict[str, float], dict[str, Any]]:
  predict = state_lib.make_predict_fn(model)
  accumulator = metrics.SupervisedAccumulator(schema.NUM_SEMANTIC_CLASSES,
                                              schema.SEMANTIC_CLASSES)
  first = {}
  for batch, whole in _host_batches(config, split, mesh):
    logits, _ = predict(state, batch["image"])
    pred = state_lib.to_host(jnp.argmax(logits, -1))
    accumulator.add(metrics.score_supervised(
        whole["semantic"], pred, whole["valid"], num_classes=schema.NUM_SEMANTIC_CLASSES))
    if not first:
      n = config.eval.num_figure_images
      first = {"image": whole["image"][:n], "semantic": whole["semantic"][:n],
               "pred": pred[:n]}
  result = accumulator.result()
  result["confusion"] = accumulator.confusion.tolist()
  return result, first


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores the newest checkpoint of `workdir`; writes results and figures there."""
  state_lib.check_config(config)
  mesh = state_lib.make_mesh()
  from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  split = pipeline.Split(config, "test")
  state, model = restore_state(config, workdir, mesh)
  step = int(jax.device_get(state.step))
  logging.info("Evaluating %s at step %d on %d test images", config.name, step,
               min(split.num_examples, config.eval.max_images or split.num_examples))
  results: dict[str, Any] = {
      "name": config.name, "checkpoint_step": step, "config": config.to_dict(),
      "num_images": min(split.num_examples, config.eval.max_images or split.num_examples)}
  if config.task == "segmentation":
    results["supervised"], first = _supervised(config, state, model, split, mesh)
    if jax.process_index() == 0:
      plots.save_supervised_figures(workdir, results["supervised"], first)
  else:
    taps = tuple(config.eval.taps)
    results["taps"], first = cluster_and_score(
        config, mesh, _tap_features_fn(state, model, taps), taps, split,
        keep_first=config.eval.num_figure_images)
    if jax.process_index() == 0:
      plots.save_tap_figures(workdir, results["taps"], first, taps)
  if jax.process_index() == 0:
    write_results(workdir, results)
  return results


def baselines(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """K-Means on raw pixels (RGB; RGB plus xy) and random masks: every table's floor."""
  mesh = state_lib.make_mesh()
  from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  split = pipeline.Split(config, "test")
  height, width = config.data.image_height, config.data.image_width
  yx = np.stack(np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width),
                            indexing="ij"), -1).astype(np.float32)

  def features(batch):
    image = batch["image"]
    coords = jnp.broadcast_to(jnp.asarray(yx), image.shape[:-1] + (2,))
    return {"pixels": image, "pixels_xy": jnp.concatenate([image, coords], -1)}

  table = {}
  for metric in ("euclidean", "cosine"):
    scored, _ = cluster_and_score(config, mesh, features, ("pixels", "pixels_xy"),
                                  split, metric=metric)
    table.update({f"kmeans_{name}_{metric}": v for name, v in scored.items()})
  table["random_masks"] = random_masks(config, split, mesh)
  results = {"name": "baselines", "config": config.to_dict(), "taps": table,
             "num_images": split.num_examples}
  if jax.process_index() == 0:
    write_results(workdir, results, stem="baselines")
  return results


def random_masks(config: ml_collections.ConfigDict, split: pipeline.Split,
                 mesh: jax.sharding.Mesh) -> dict[str, dict[str, float]]:
  """I.i.d. uniform labels over K per pixel: the floor any method must beat."""
  accumulators = {m: metrics.MeanAccumulator() for m in K_MODES}
  rng = np.random.default_rng(config.eval.baselines_seed)
  for _, whole in _host_batches(config, split, mesh):
    for mode in K_MODES:
      k = whole["num_masks"] if mode == "oracle_k" else np.full_like(
          whole["num_masks"], config.eval.kmeans.fixed_k)
      labels = (rng.random(whole["instance_labels"].shape)
                * np.maximum(k, 1)[:, None, None]).astype(np.int32)
      _score(accumulators[mode], labels, whole, k_max(config))
  return {m: accumulators[m].result() for m in K_MODES}


def write_results(workdir: str, results: dict[str, Any], stem: str = "results") -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"{stem}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=float)
  with open(os.path.join(workdir, f"{stem}.md"), "w", encoding="utf-8") as f:
    f.write(results_markdown(results))
  logging.info("Wrote %s/%s.json and %s.md\n%s", workdir, stem, stem,
               results_markdown(results))


def results_markdown(results: dict[str, Any]) -> str:
  lines = [f"# {results['name']}", ""]
  if "checkpoint_step" in results:
    lines.append(f"Checkpoint step {results['checkpoint_step']}, "
                 f"{results['num_images']} test images.")
  if "supervised" in results:
    sup = results["supervised"]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sup.items() if k != "confusion"]
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
              "| | " + " | ".join(schema.SEMANTIC_CLASSES) + " |",
              "|---" * (schema.NUM_SEMANTIC_CLASSES + 1) + "|"]
    for name, row in zip(schema.SEMANTIC_CLASSES, sup["confusion"]):
      lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |")
  for mode in K_MODES:
    if "taps" not in results:
      break
    title = "oracle K (true masks, background included)" if mode == "oracle_k" else "fixed K"
    lines += ["", f"## {title}", "",
              "| tap | " + " | ".join(metrics.INSTANCE_METRICS) + " |",
              "|---" * (len(metrics.INSTANCE_METRICS) + 1) + "|"]
    for tap, by_mode in results["taps"].items():
      row = by_mode[mode]
      lines.append(f"| {tap} | " + " | ".join(
          f"{row.get(m, float('nan')):.4f}" for m in metrics.INSTANCE_METRICS) + " |")
  return "\n".join(lines) + "\n"


def _load_png(path: str) -> np.ndarray:
  """Any PNG (RGB, RGBA, gray, palette) -> float32 RGB [H, W, 3] in [0, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"), np.float32) / 255.0


def _png_files(paths: Iterable[str]) -> list[str]:
  files = []
  for path in paths:
    if os.path.isdir(path):
      files += sorted(os.path.join(path, f) for f in os.listdir(path)
                      if f.lower().endswith(".png"))
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"--images: no file or folder at {path!r}")
  if not files:
    raise FileNotFoundError(f"--images: no PNG files in {list(paths)}")
  return files


def segment_images(config: ml_collections.ConfigDict, workdir: str, paths: Iterable[str], *,
                   tap: str, num_clusters: int, output_dir: str) -> list[str]:
  """Clusters one tap of each PNG into `num_clusters` masks; writes a label PNG per image.

  Images keep their size: they are padded (edge pixels repeated) up to the
  network's multiple of 2**depth, never resized, and the labels are cropped
  back. Each tap pixel is weighted by the number of real (unpadded) image
  pixels it covers, so the padding does not pull the clusters.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  valid_taps = models.tap_names(config.model.depth)
  if tap not in valid_taps:
    raise ValueError(f"--tap={tap!r} is not one of {list(valid_taps)}")
  if not 1 <= num_clusters <= 255:
    raise ValueError(f"--num_clusters={num_clusters} must be in 1..255")
  files = _png_files(paths)
  mesh = state_lib.make_mesh()
  if tap == "input":
    state, predict = None, None  # raw pixels: no checkpoint needed
  else:
    state, model = restore_state(config, workdir, mesh)
    predict = state_lib.make_predict_fn(model, (tap,))  # one jit: images of a size share it
  km = config.eval.kmeans
  run_kmeans = jax.jit(functools.partial(
      kmeans.kmeans, k_max=num_clusters, num_restarts=km.num_restarts,
      max_iter=km.max_iter, tol=km.tol, metric=km.metric, init=km.init))
  factor = 2 ** config.model.depth
  os.makedirs(output_dir, exist_ok=True)
  palette = plots.label_colors(num_clusters + 1)[1:]
  written = []
  for path in files:
    rgb = _load_png(path)
    height, width = rgb.shape[:2]
    pad = ((0, -height % factor), (0, -width % factor), (0, 0))
    image = np.pad(rgb, pad, mode="edge")
    if config.data.grayscale:
      image = image @ np.asarray(schema.LUMINANCE_WEIGHTS, np.float32)[:, None]
    real = np.pad(np.ones((height, width), np.float32), pad[:2])
    if predict is None:
      features = jnp.asarray(image[None])
    else:
      features = predict(state, jnp.asarray(image[None]))[1][tap]
    _, h, w, c = features.shape
    f = image.shape[0] // h
    weights = real.reshape(h, f, w, f).sum((1, 3)).reshape(1, h * w)
    result = run_kmeans(features.reshape(1, h * w, c), jnp.array([num_clusters]),
                        jax.random.key(config.seed), point_weights=jnp.asarray(weights))
    labels = np.asarray(kmeans.upsample_labels(result.labels.reshape(1, h, w),
                                               image.shape[0], image.shape[1]))[0]
    labels = labels[:height, :width].astype(np.uint8)
    stem = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0])
    Image.fromarray(labels, mode="L").save(f"{stem}_labels.png")
    Image.fromarray(palette[labels]).save(f"{stem}_masks.png")
    written.append(f"{stem}_labels.png")
    logging.info("%s (%dx%d): %d clusters of tap %s -> %s_labels.png", path, height,
                 width, len(np.unique(labels)), tap, stem)
  return written
