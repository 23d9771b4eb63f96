"""Object-aware objectives on per-pixel embeddings, added to the
reconstruction loss with weights from `config.objectives`.

Reconstruction alone does not make the pixels of one object similar and the
pixels of two objects different; these terms do:

  discriminative_loss  De Brabandere et al. 2017, on pseudo-instance masks: pull
                       each pixel to within `delta_v` of its mask's mean, push
                       the means of two masks beyond 2 * `delta_d` apart.
  mask_infonce         DetCon-style: masks pooled in one view are the
                       positives of the same masks (or of their pixels) in the
                       other view; every other mask of the global batch is a
                       negative.
  view_infonce         PixPro / VADeR-style dense consistency: a point seen by
                       two geometric views has similar embeddings in both;
                       the other sampled points of the global batch are the
                       negatives.

All functions are per-device code (usable inside `shard_map` or a named
`vmap`) with an optional `axis_name`. Each returns this device's share: the
mean over the axis of the returned values is the loss of the global batch,
whatever the number of devices. The train step already averages its loss over
the axis, so these terms are added to it as they are. Examples with
`valid=False` (evaluation padding) count nowhere.

This module imports neither TensorFlow nor `clevr_jax.data`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from clevr_jax.objects import views

# The three terms, by their config section name.
TERMS = ("discriminative", "mask_infonce", "view_infonce")
# The views of an example, in the order the train step stacks them.
VIEW_NAMES = ("a", "b")
# Logit given to keys that are not candidates: finite, so that a row with no
# candidate at all (a padded query, weighted 0) stays free of NaN.
_MASKED_LOGIT = -1e9


# --- helpers ---------------------------------------------------------------


def _axis_size(axis_name: str | None) -> int:
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def global_mean(values: jax.Array, weights: jax.Array, axis_name: str | None) -> jax.Array:
  """This device's share of the weighted mean over the global batch.

  Returns sum(weights * values) * D / W, with D devices on the axis and W the
  global sum of weights: its mean over the axis is the global weighted mean.
  The weights (validity) are counts, not functions of the parameters.
  """
  weights = jax.lax.stop_gradient(weights.astype(values.dtype))
  total = jnp.sum(weights)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  share = jnp.sum(values * weights) * _axis_size(axis_name)
  return jnp.where(total > 0, share / jnp.maximum(total, 1e-12), 0.0)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / |x| along the last axis; finite gradient at 0."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps**2))


def _norm(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """|x| along the last axis; zero gradient (not NaN) at x = 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), -1), eps))


def downsample_labels(labels: jax.Array, size: tuple[int, int], num_labels: int,
                      min_purity: float = 0.0) -> jax.Array:
  """Label maps [B, H, W] -> [B, h, w] by majority over each block of pixels.

  Labels outside [0, num_labels) are ignored. A block gets -1 (ignored by the
  losses) when it holds no valid label or when its majority covers no more than
  `min_purity` of it (blocks on a boundary between two masks).
  """
  b, height, width = labels.shape
  h, w = size
  if height % h or width % w:
    raise ValueError(f"labels of size {height}x{width} do not downsample to {h}x{w}")
  fy, fx = height // h, width // w
  onehot = jax.nn.one_hot(labels, num_labels, dtype=jnp.float32)
  fractions = onehot.reshape(b, h, fy, w, fx, num_labels).mean(axis=(2, 4))
  purity = fractions.max(-1)
  majority = jnp.argmax(fractions, -1).astype(jnp.int32)
  return jnp.where((purity > 0) & (purity > min_purity), majority, -1)


def mask_pool(embeddings: jax.Array, labels: jax.Array, num_labels: int
              ) -> tuple[jax.Array, jax.Array]:
  """Mean embedding of each label: ([B, M, d], pixel counts [B, M]).

  Pixels with label -1 (or >= num_labels) belong to no mask.
  """
  b, h, w, d = embeddings.shape
  onehot = jax.nn.one_hot(labels.reshape(b, h * w), num_labels, dtype=embeddings.dtype)
  counts = onehot.sum(1)
  sums = jnp.einsum("bpm,bpd->bmd", onehot, embeddings.reshape(b, h * w, d))
  return sums / jnp.maximum(counts, 1.0)[..., None], counts


# --- discriminative loss ----------------------------------------------------


def discriminative_loss(embeddings: jax.Array, labels: jax.Array, valid: jax.Array, *,
                        num_labels: int, delta_v: float, delta_d: float,
                        var_weight: float = 1.0, dist_weight: float = 1.0,
                        reg_weight: float = 0.001, normalize: bool = False,
                        axis_name: str | None = None) -> jax.Array:
  """De Brabandere et al.'s discriminative loss, averaged over valid images.

  Per image, with C masks present, mean mu_c and n_c pixels in mask c:
    var  = 1/C sum_c 1/n_c sum_{p in c} max(0, |mu_c - x_p| - delta_v)^2
    dist = 1/(C(C-1)) sum_{c != c'} max(0, 2 delta_d - |mu_c - mu_c'|)^2
    reg  = 1/C sum_c |mu_c|
  and the loss is var_weight * var + dist_weight * dist + reg_weight * reg.

  Args:
    embeddings: [B, h, w, d] per-pixel embeddings (float32).
    labels: int [B, h, w] mask of each pixel (already at the embeddings'
      resolution: see `downsample_labels`); -1 for pixels that count nowhere.
    valid: bool [B]; invalid images count nowhere.
    normalize: L2-normalise the embeddings first (for cosine K-Means; the
      margins then live on the unit sphere).
  """
  x = l2_normalize(embeddings) if normalize else embeddings
  b, h, w, d = x.shape
  means, counts = mask_pool(x, labels, num_labels)
  present = counts > 0
  num_masks = present.sum(-1).astype(x.dtype)
  onehot = jax.nn.one_hot(labels.reshape(b, h * w), num_labels, dtype=x.dtype)
  own_mean = jnp.einsum("bpm,bmd->bpd", onehot, means)
  pull = jnp.square(jnp.maximum(_norm(x.reshape(b, h * w, d) - own_mean) - delta_v, 0.0))
  per_mask_pull = jnp.einsum("bpm,bp->bm", onehot, pull) / jnp.maximum(counts, 1.0)
  var = per_mask_pull.sum(-1) / jnp.maximum(num_masks, 1.0)

  gaps = _norm(means[:, :, None, :] - means[:, None, :, :])
  pairs = present[:, :, None] & present[:, None, :] & ~jnp.eye(num_labels, dtype=bool)
  push = jnp.square(jnp.maximum(2.0 * delta_d - gaps, 0.0)) * pairs
  dist = push.sum((1, 2)) / jnp.maximum(num_masks * (num_masks - 1.0), 1.0)

  reg = (_norm(means) * present).sum(-1) / jnp.maximum(num_masks, 1.0)
  per_image = var_weight * var + dist_weight * dist + reg_weight * reg
  return global_mean(per_image, valid & (num_masks > 0), axis_name)


# --- InfoNCE ------------------------------------------------------------------


def info_nce(queries: jax.Array, keys: jax.Array, positive: jax.Array,
             query_valid: jax.Array, key_valid: jax.Array, *, temperature: float,
             exclude: jax.Array | None = None, axis_name: str | None = None) -> jax.Array:
  """InfoNCE of local queries against the keys of every device.

  Args:
    queries: [Q, d] L2-normalised.
    keys: [K, d] L2-normalised, this device's keys; with `axis_name` the keys
      of all devices are candidates (gathered, so gradients reach every device).
    positive: int [Q], index of each query's positive among the local keys.
    query_valid, key_valid: bool [Q], [K].
    exclude: optional bool [Q, K]: local keys that are neither negatives nor
      positives for a query (e.g. points of the same object).
  """
  num_keys = keys.shape[0]
  if axis_name is not None:
    offset = (jax.lax.axis_index(axis_name) * num_keys).astype(jnp.int32)
    all_keys = jax.lax.all_gather(keys, axis_name, tiled=True)
    all_valid = jax.lax.all_gather(key_valid, axis_name, tiled=True)
  else:
    offset, all_keys, all_valid = 0, keys, key_valid
  positive = positive + offset
  logits = queries @ all_keys.T / temperature
  candidate = jnp.broadcast_to(all_valid[None, :], logits.shape)
  if exclude is not None:
    if axis_name is not None:
      exclude = jax.lax.dynamic_update_slice(
          jnp.zeros(logits.shape, bool), exclude, (jnp.int32(0), offset))
    candidate = candidate & ~exclude
  is_positive = jnp.arange(logits.shape[1])[None, :] == positive[:, None]
  logits = jnp.where(candidate | is_positive, logits, _MASKED_LOGIT)
  positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  losses = jax.nn.logsumexp(logits, axis=1) - positive_logit
  pos_valid = jnp.take_along_axis(jnp.broadcast_to(all_valid[None], logits.shape),
                                  positive[:, None], axis=1)[:, 0]
  return global_mean(losses, query_valid & pos_valid, axis_name)


def _sample_pixels(keys: jax.Array, labels: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
  """Up to `num` distinct labelled pixels per image: (flat index [B, num], valid [B, num])."""
  b = labels.shape[0]
  flat = labels.reshape(b, -1)
  scores = jax.vmap(lambda k: jax.random.uniform(k, (flat.shape[1],)))(keys)
  scores = jnp.where(flat >= 0, scores, scores - 2.0)  # labelled pixels first
  top, index = jax.lax.top_k(scores, min(num, flat.shape[1]))
  return index, top >= 0


def mask_infonce(emb_q: jax.Array, labels_q: jax.Array, emb_k: jax.Array,
                 labels_k: jax.Array, valid: jax.Array, *, num_labels: int,
                 temperature: float, queries: str = "mask", num_pixel_queries: int = 64,
                 example_keys: jax.Array | None = None,
                 axis_name: str | None = None) -> jax.Array:
  """Mask-pooled InfoNCE (DetCon-style).

  Keys are the L2-normalised mean embeddings of every mask of view k; a
  query's positive is the same mask (same label) of the same image.

  queries='mask': queries are the masks pooled in view q (DetCon; needs two
    different views, or the positive is the query itself).
  queries='pixel': queries are `num_pixel_queries` random labelled pixels per
    image of view q (drawn with `example_keys`, [B] keys); meaningful with a
    single view too (emb_k = emb_q): each pixel must pick its own mask among
    all masks of the batch.

  Args:
    emb_q, emb_k: [B, h, w, d]; labels_q, labels_k: int [B, h, w] (-1: none),
      the same masks seen in each view.
    valid: bool [B].
  """
  b, h, w, d = emb_q.shape
  pooled_k, counts_k = mask_pool(emb_k, labels_k, num_labels)
  keys = l2_normalize(pooled_k).reshape(b * num_labels, d)
  key_valid = ((counts_k > 0) & valid[:, None]).reshape(-1)
  if queries == "mask":
    pooled_q, counts_q = mask_pool(emb_q, labels_q, num_labels)
    q = l2_normalize(pooled_q).reshape(b * num_labels, d)
    query_valid = ((counts_q > 0) & valid[:, None]).reshape(-1)
    positive = jnp.arange(b * num_labels)
  elif queries == "pixel":
    if example_keys is None:
      raise ValueError("mask_infonce(queries='pixel') needs example_keys")
    index, picked = _sample_pixels(example_keys, labels_q, num_pixel_queries)
    flat_emb = emb_q.reshape(b, h * w, d)
    q = jnp.take_along_axis(flat_emb, index[..., None], axis=1)
    q = l2_normalize(q).reshape(-1, d)
    label = jnp.take_along_axis(labels_q.reshape(b, h * w), index, axis=1)
    query_valid = (picked & valid[:, None]).reshape(-1)
    positive = (jnp.arange(b)[:, None] * num_labels + jnp.maximum(label, 0)).reshape(-1)
  else:
    raise ValueError(f"objectives.mask_infonce.queries={queries!r}: use 'mask' or 'pixel'")
  return info_nce(q, keys, positive, query_valid, key_valid, temperature=temperature,
                  axis_name=axis_name)


def view_infonce(emb_a: jax.Array, emb_b: jax.Array, points_a: jax.Array,
                 points_b: jax.Array, points_source: jax.Array, valid: jax.Array, *,
                 temperature: float, exclude_radius: float = 0.0, symmetric: bool = True,
                 axis_name: str | None = None) -> jax.Array:
  """Dense view-consistency InfoNCE (PixPro / VADeR-style).

  Each sampled point is a query in one view whose positive is the same point
  in the other view; the other sampled points of the global batch are the
  negatives, except points of the same image within `exclude_radius` (source
  coordinates) of the query, which are likely the same object and are left
  out. exclude_radius >= 2 leaves only other images' points as negatives.

  Args:
    emb_a, emb_b: [B, h, w, d] embeddings of the two views.
    points_a, points_b, points_source: [B, N, 2] normalised coordinates of the
      same points in view a, view b and the source (`views.shared_points`).
    valid: bool [B]: example valid and its crops overlap.
  """
  b, n = points_a.shape[:2]
  q_a = l2_normalize(views.sample_bilinear(emb_a, points_a)).reshape(b * n, -1)
  q_b = l2_normalize(views.sample_bilinear(emb_b, points_b)).reshape(b * n, -1)
  point_valid = jnp.repeat(valid, n)
  positive = jnp.arange(b * n)
  exclude = None
  if exclude_radius > 0:
    image = jnp.repeat(jnp.arange(b), n)
    src = points_source.reshape(b * n, 2)
    near = _norm(src[:, None, :] - src[None, :, :]) < exclude_radius
    exclude = (image[:, None] == image[None, :]) & near & ~jnp.eye(b * n, dtype=bool)
  kwargs = dict(temperature=temperature, exclude=exclude, axis_name=axis_name)
  loss = info_nce(q_a, q_b, positive, point_valid, point_valid, **kwargs)
  if symmetric:
    loss = 0.5 * (loss + info_nce(q_b, q_a, positive, point_valid, point_valid, **kwargs))
  return loss


# --- what the train step calls ------------------------------------------------


def weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {t: float(config.objectives[t].weight) for t in TERMS}


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether any objective term is on (all weights 0 by default)."""
  return "objectives" in config and any(w > 0 for w in weights(config).values())


def needs_pseudo_masks(config: ml_collections.ConfigDict) -> bool:
  w = weights(config)
  return w["discriminative"] > 0 or w["mask_infonce"] > 0


def needs_two_views(config: ml_collections.ConfigDict) -> bool:
  w = weights(config)
  return (w["view_infonce"] > 0 or bool(config.objectives.views.two_views)
          or (w["mask_infonce"] > 0 and config.objectives.mask_infonce.queries == "mask"))


def required_taps(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The taps the forward pass must return for the objectives."""
  return (config.objectives.tap,) if enabled(config) else ()


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line, what to do) on an inconsistent objectives config."""
  if not enabled(config):
    return
  obj = config.objectives
  for term in TERMS:
    if obj[term].weight < 0:
      raise ValueError(f"config.objectives.{term}.weight must be >= 0; got {obj[term].weight}")
  if obj.tap == "embedding" and config.model.get("embedding_dim", 0) <= 0:
    raise ValueError("config.objectives.tap='embedding' needs an embedding head: set "
                     "config.model.embedding_dim > 0 and config.model.embedding_tap")
  if config.task != "reconstruction":
    raise ValueError("config.objectives apply to task='reconstruction' only")
  if needs_pseudo_masks(config) and config.data.grayscale:
    raise ValueError("pseudo-masks come from colour: set config.data.grayscale=False or "
                     "the discriminative and mask_infonce weights to 0")
  for term in ("mask_infonce", "view_infonce"):
    if obj[term].weight > 0 and obj[term].temperature <= 0:
      raise ValueError(f"config.objectives.{term}.temperature must be > 0")
  if needs_two_views(config) and config.loss.weighted:
    raise ValueError("config.loss.weighted derives its weights from the original image, "
                     "not from the two views: set config.loss.weighted=False or turn the "
                     "two-view terms off")
  if obj.mask_infonce.queries not in ("mask", "pixel"):
    raise ValueError(f"config.objectives.mask_infonce.queries={obj.mask_infonce.queries!r}: "
                     "use 'mask' or 'pixel'")


def prepare_views(config: ml_collections.ConfigDict, key: jax.Array,
                  batch: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """The images the forward pass sees, and what the objectives need about them.

  With two views (see `needs_two_views`), each example gets two random resized
  crops (+ flips) of its image at the image's own size, keyed by its `index`
  (so an example's views do not depend on the device split); otherwise the one
  view 'a' is the image itself. Pseudo-masks (`batch['pseudo_labels']`, int
  [B, H, W], when present) are warped into each view with nearest sampling.

  Returns:
    ({'a': images [B, H, W, C]} or {'a': ..., 'b': ...}, additions to the batch:
    'pseudo_labels_a'/'_b', and with two views 'points_a', 'points_b',
    'points_source' [B, N, 2] and 'points_valid' [B]).
  """
  image = batch["image"]
  index = batch.get("index")
  if index is None:
    index = jnp.arange(image.shape[0])
  per_example = views.example_keys(key, index)
  k_a, k_b, k_points = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(per_example)
                        for i in range(3))
  extra: dict[str, Any] = {}
  if needs_two_views(config):
    params = {"a": views.sample_params(k_a, config.objectives.views),
              "b": views.sample_params(k_b, config.objectives.views)}
    src, pa, pb, overlap = views.shared_points(
        k_points, params["a"], params["b"], int(config.objectives.view_infonce.num_points))
    extra.update(points_source=src, points_a=pa, points_b=pb,
                 points_valid=overlap & batch["valid"].astype(bool))
  else:
    params = {"a": views.identity_params(image.shape[0])}
  two = len(params) == 2
  images = {v: views.render(image, p) if two else image for v, p in params.items()}
  if "pseudo_labels" in batch:
    labels = batch["pseudo_labels"].astype(jnp.int32)
    for v, p in params.items():
      extra[f"pseudo_labels_{v}"] = (
          views.render(labels[..., None], p, nearest=True)[..., 0] if two else labels)
  return images, extra


def objective_terms(config: ml_collections.ConfigDict,
                    outputs_by_view: dict[str, dict[str, jax.Array]],
                    batch: dict[str, jax.Array], axis_name: str | None,
                    key: jax.Array | None = None) -> dict[str, jax.Array]:
  """The enabled objective terms of one per-device batch.

  Args:
    outputs_by_view: {'a': taps} or {'a': taps, 'b': taps}, each holding
      `config.objectives.tap` ([B, h, w, d], float32).
    batch: the per-device batch with the additions of `prepare_views`, and
      'valid' [B].
    axis_name: the data-parallel axis, or None.
    key: randomness of the pixel queries (mask_infonce 'pixel'); drawn per
      example from batch['index'], so the same on any device split with
      JAX's default (threefry) keys; 'rbg' keys promise no such thing under
      shard_map.

  Returns:
    {term: unweighted value} for each term with weight > 0, and 'total': the
    weighted sum (0 when none is on). Each value is this device's share (its
    mean over `axis_name` is the global batch's value).
  """
  obj = config.objectives
  w = weights(config)
  terms: dict[str, jax.Array] = {}
  valid = batch["valid"].astype(bool)
  emb = {v: outs[obj.tap] for v, outs in outputs_by_view.items()}
  m = int(obj.pseudo_masks.max_labels)

  def labels(view: str) -> jax.Array:
    full = batch[f"pseudo_labels_{view}"]
    return downsample_labels(full, emb[view].shape[1:3], m, obj.pseudo_masks.min_purity)

  if w["discriminative"] > 0:
    d = obj.discriminative
    values = [discriminative_loss(
        emb[v], labels(v), valid, num_labels=m, delta_v=d.delta_v, delta_d=d.delta_d,
        var_weight=d.var_weight, dist_weight=d.dist_weight, reg_weight=d.reg_weight,
        normalize=d.normalize, axis_name=axis_name) for v in emb]
    terms["discriminative"] = sum(values) / len(values)
  if w["mask_infonce"] > 0:
    c = obj.mask_infonce
    if key is None:
      key = jax.random.key(0)
    index = batch.get("index", jnp.arange(valid.shape[0]))
    q_view, k_view = ("a", "b") if "b" in emb else ("a", "a")
    kwargs = dict(num_labels=m, temperature=c.temperature, queries=c.queries,
                  num_pixel_queries=int(c.num_pixel_queries), axis_name=axis_name)
    loss = mask_infonce(emb[q_view], labels(q_view), emb[k_view], labels(k_view), valid,
                        example_keys=views.example_keys(key, index), **kwargs)
    if "b" in emb:  # symmetric: each view queries the other
      loss = 0.5 * (loss + mask_infonce(
          emb["b"], labels("b"), emb["a"], labels("a"), valid,
          example_keys=views.example_keys(jax.random.fold_in(key, 1), index), **kwargs))
    terms["mask_infonce"] = loss
  if w["view_infonce"] > 0:
    if "b" not in emb:
      raise ValueError("objectives.view_infonce needs two views (see prepare_views)")
    c = obj.view_infonce
    terms["view_infonce"] = view_infonce(
        emb["a"], emb["b"], batch["points_a"], batch["points_b"], batch["points_source"],
        batch["points_valid"], temperature=c.temperature, exclude_radius=c.exclude_radius,
        symmetric=c.symmetric, axis_name=axis_name)
  terms["total"] = sum((w[t] * v for t, v in terms.items()), jnp.zeros((), jnp.float32))
  return terms
