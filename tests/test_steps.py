"""Tests of the state, the device-side batch derivation, the objective and the steps.

The data-parallel comparison runs in child processes (this process keeps one
CPU device): see `data_parallel_run` in conftest.py and
tests/helpers/data_parallel.py. They start with this module and run beside its
other tests; its last tests wait for them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import samples
from clevr_jax import models
from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.data import pipeline
from clevr_jax.training import batch as batch_lib
from clevr_jax.training import state as state_lib
from clevr_jax.training import train_step
from tests.helpers.early_start import selected_in_module


@pytest.fixture(scope="module", autouse=True)
def _start_data_parallel_runs(request):
  """Starts the children when a selected test needs them: they overlap with the rest."""
  if selected_in_module(request, "data_parallel_run"):
    start = request.getfixturevalue("data_parallel_run")
    start(1, wait=False, float64=True)
    start(4, wait=False, float64=True)


# --- supervised targets and the gray map from hand-made stored examples ------

# Slot codes of two stored examples: slot 0 background, then objects.
_SHAPES = np.zeros((2, schema.MAX_SLOTS), np.uint8)
_SHAPES[0, :4] = [0, 3, 1, 2]  # slot 1 cube, slot 2 sphere, slot 3 cylinder
_SHAPES[1, :3] = [0, 1, 3]  # slot 1 sphere, slot 2 cube: same slots, other shapes
_VISIBILITY = np.zeros((2, schema.MAX_SLOTS), np.uint8)
_VISIBILITY[0, :4] = 1
_VISIBILITY[1, :3] = 1


def _stored_batch():
  labels = np.array([[[0, 0, 1, 1],
                      [0, 2, 2, 0],
                      [3, 3, 0, 0]],
                     [[0, 1, 1, 0],
                      [0, 0, 2, 2],
                      [0, 0, 0, 0]]], np.uint8)
  image = np.full(labels.shape + (3,), 128, np.uint8)
  image[0, 0, 2] = (173, 35, 35)  # red: not gray
  image[0, 0, 3] = (100, 105, 110)  # channels spread by exactly 10: gray
  image[0, 1, 1] = (100, 105, 111)  # spread 11: not gray
  image[1, 0, 1] = (255, 238, 51)  # yellow
  return {"image": image, "labels": labels, "shape": _SHAPES,
          "visibility": _VISIBILITY, "valid": np.ones(2, bool),
          "index": np.arange(2, dtype=np.int32)}


def _derive(stored, grayscale=False):
  config = _FakeConfig(grayscale)
  out = batch_lib.make_derive(config)({k: jnp.asarray(v) for k, v in stored.items()})
  return {k: np.asarray(v) for k, v in out.items()}


class _FakeConfig:
  """What `derive` reads of a config."""

  def __init__(self, grayscale):
    self.data = type("Data", (), {"grayscale": grayscale})()


def test_supervised_targets_are_each_pixels_object_shape():
  stored = _stored_batch()
  out = _derive(stored)
  sphere, cylinder, cube = (schema.SEMANTIC_CLASSES.index(s)
                            for s in ("sphere", "cylinder", "cube"))
  expected = np.array([[[0, 0, cube, cube],
                        [0, sphere, sphere, 0],
                        [cylinder, cylinder, 0, 0]],
                       [[0, sphere, sphere, 0],
                        [0, 0, cube, cube],
                        [0, 0, 0, 0]]])
  np.testing.assert_array_equal(out["semantic"], expected)
  np.testing.assert_array_equal(out["instance_labels"], stored["labels"])
  np.testing.assert_array_equal(out["num_masks"], [4, 3])  # background included
  gray = np.ones(stored["labels"].shape, bool)
  gray[0, 0, 2] = gray[0, 1, 1] = gray[1, 0, 1] = False
  np.testing.assert_array_equal(out["gray_mask"], gray)
  # XLA may turn x / 255 into x * (1 / 255): one rounding more, at most one
  # float32 ulp apart (relative 2**-23).
  np.testing.assert_allclose(out["image"], stored["image"].astype(np.float32) / 255,
                             rtol=2**-23, atol=0)
  np.testing.assert_array_equal(out["valid"], stored["valid"])
  np.testing.assert_array_equal(out["index"], stored["index"])


def test_grayscale_input_is_the_luminance_and_keeps_the_colour_gray_map():
  stored = _stored_batch()
  rgb, gray = _derive(stored), _derive(stored, grayscale=True)
  assert gray["image"].shape == stored["labels"].shape + (1,)
  luminance = stored["image"].astype(np.float64) @ np.array(schema.LUMINANCE_WEIGHTS) / 255
  # Three float32 products and two sums of values <= 1: a few ulps of 1 (1.2e-7).
  np.testing.assert_allclose(gray["image"][..., 0], luminance, rtol=0, atol=1e-6)
  # The gray map comes from the colours, which the gray image no longer has.
  np.testing.assert_array_equal(gray["gray_mask"], rgb["gray_mask"])


def test_fields_send_only_what_the_step_reads(test_config):
  assert batch_lib.fields(test_config("unet_rgb"), "train") == ("image",)
  assert batch_lib.fields(test_config("unet_gray"), "train") == ("image",)
  assert batch_lib.fields(test_config("unet_supervised"), "train") == (
      "image", "labels", "shape")
  assert "valid" in batch_lib.fields(test_config("unet_rgb"), "eval_loss")
  assert batch_lib.fields(test_config("unet_rgb"), "evaluate") == batch_lib.STORED
  with pytest.raises(ValueError, match="purpose"):
    batch_lib.fields(test_config("unet_rgb"), "bogus")


# --- the objective -----------------------------------------------------------

_A, _B = 0.1, 0.5  # error on gray pixels, on coloured pixels


def _loss(config, output, batch):
  return float(train_step.objective(config, output, {}, batch, None)[0])


def _recon_batch(gray_rows):
  """[n, 4, 4, 1] target 0 and output with error _A on gray, _B on colour pixels.

  gray_rows[i]: how many of image i's 4 rows are gray.
  """
  gray = np.zeros((len(gray_rows), 4, 4), bool)
  for i, rows in enumerate(gray_rows):
    gray[i, :rows] = True
  output = np.where(gray, _A, _B)[..., None].astype(np.float32)
  return jnp.asarray(output), {"image": jnp.zeros_like(output), "gray_mask": jnp.asarray(gray)}


def test_weighted_objective_averages_the_gray_and_colour_groups(test_config):
  # 3/4 of the pixels gray: plain MSE weights the groups 3:1, the poster's
  # weighted loss 1:1.
  output, batch = _recon_batch([3, 3])
  weighted = test_config("unet_gray")
  assert weighted.loss.weighted
  assert _loss(weighted, output, batch) == pytest.approx(
      (_A**2 + _B**2) / 2, rel=1e-6)
  plain = test_config("unet_rgb")
  assert _loss(plain, output, batch) == pytest.approx(
      0.75 * _A**2 + 0.25 * _B**2, rel=1e-6)


def test_weighted_objective_counts_gray_pixels_over_the_whole_global_batch(test_config):
  # Two "devices" (a named vmap axis stands in for shard_map's): one all gray,
  # one half gray. Averaged over devices, the loss must be the global batch's,
  # which needs the group sizes summed over the axis: weights per device
  # would give (3 A^2 + B^2) / 4 here.
  config = test_config("unet_gray")
  output, batch = _recon_batch([4, 2])
  split = lambda x: x.reshape((2, 1) + x.shape[1:])  # [devices, per-device batch, ...]
  per_device = jax.vmap(lambda o, b: train_step.objective(config, o, {}, b, "batch")[0],
                        axis_name="batch")(split(output), jax.tree.map(split, batch))
  global_loss = _loss(config, output, batch)
  assert global_loss == pytest.approx((_A**2 + _B**2) / 2, rel=1e-6)
  assert float(per_device.mean()) == pytest.approx(global_loss, rel=1e-6)


def test_segmentation_objective_is_the_pixel_cross_entropy(test_config):
  config = test_config("unet_supervised")
  labels = jnp.array([[[0, 1], [2, 3]]])
  logits = jnp.zeros((1, 2, 2, schema.NUM_SEMANTIC_CLASSES)).at[0, 0, 0, 0].set(2.0)
  # Uniform logits give log(4) per pixel; the first pixel's true class has 2 more.
  first = -math.log(math.exp(2.0) / (math.exp(2.0) + 3))
  expected = (first + 3 * math.log(4)) / 4
  loss = _loss(config, logits, {"semantic": labels})
  assert loss == pytest.approx(expected, rel=1e-6)


# --- training on a fixed batch -----------------------------------------------


def _small(config):
  # A one-level network of width 4 compiles in seconds (the full one trains in
  # trained_workdir and in the data-parallel runs).
  config.model.depth, config.model.base_width = 1, 4
  return config


@pytest.mark.parametrize("name", ["unet_rgb", "unet_gray", "unet_supervised"])
def test_loss_goes_down_on_a_fixed_batch(name, test_config):
  # The :test configs' task, loss, input and optimizer with the real steps, on
  # one device, fed the stored fields the pipeline sends.
  config = _small(test_config(name))
  host_batch = next(pipeline.Split(config, "train").train_batches(
      0, fields=batch_lib.fields(config, "train")))
  mesh = sharding.make_mesh()
  model = models.make_model(config, axis_name=sharding.AXIS)
  tx = train_step.make_optimizer(config, 8)
  state = sharding.replicate(state_lib.create_state(config, tx), mesh)
  step = train_step.make_train_step(config, model, tx, mesh)
  batch = sharding.to_global(host_batch, mesh)
  assert batch["image"].dtype == jnp.uint8
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))  # the loss before this step's update
    assert math.isfinite(float(metrics["grad_norm"]))
  # Measured over config seeds 0-3 (initial parameters and batch): every step
  # lowers the loss; after 6 steps it is 0.10-0.17x (rgb), 0.05-0.13x (gray),
  # 0.24-0.51x (supervised) the first. A step that does not learn leaves it
  # near 1x; 0.75x clears the slowest seed by a margin.
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.75 * losses[0], losses
  assert int(state.step) == 6


@pytest.mark.parametrize("name", ["unet_rgb", "unet_gray", "unet_supervised"])
def test_eval_loss_is_the_train_objective_in_eval_mode(name, test_config):
  # The eval step sums example_losses over valid examples; the train step
  # averages the same function. On a batch with padding, the eval loss must be
  # the objective of the valid examples alone (padding out of the weighted
  # loss's counts too).
  config = _small(test_config(name))
  mesh = sharding.make_mesh()
  model = models.make_model(config)
  host_state = state_lib.create_state(config, train_step.make_optimizer(config, 1))
  state = sharding.replicate(host_state, mesh)
  stored = samples.random_stored(config, config.eval.batch_size, seed=3)
  stored["valid"][5:] = False
  sums = train_step.make_eval_step(config, model, mesh)(state, sharding.to_global(
      {k: stored[k] for k in batch_lib.fields(config, "eval_loss")}, mesh))
  eval_loss = float(sums["loss_sum"] / sums["count"])
  assert float(sums["count"]) == 5
  valid = batch_lib.derive({k: jnp.asarray(v[:5]) for k, v in stored.items()}, config)
  output, _ = model.apply({"params": host_state.params, "batch_stats": host_state.batch_stats},
                          valid["image"], train=False)
  train_loss = float(train_step.objective(config, output, {}, valid, None)[0])
  # The same float32 terms summed in another order: a few ulps.
  assert eval_loss == pytest.approx(train_loss, rel=1e-5)
  if name == "unet_supervised":
    assert int(np.asarray(sums["confusion"]).sum()) == 5 * np.prod(stored["labels"].shape[1:])


# --- the state -----------------------------------------------------------------


def _kernel_kind(path: tuple[str, ...]) -> str:
  """Which flax layer a kernel belongs to, from its module path (models.py's names)."""
  module = path[-2]
  if module in ("query", "key", "value"):
    return "attention q/k/v (DenseGeneral)"
  if module == "out":
    return "attention out (DenseGeneral)"
  if module.startswith("mlp"):
    return "dense"
  if module.startswith("up"):
    return "transposed conv"
  return "conv"


def _kernels(params) -> dict[tuple[str, ...], np.ndarray]:
  return {tuple(getattr(k, "key", str(k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(params)
          if getattr(path[-1], "key", None) == "kernel"}


_REFERENCE_DRAWS = 8


def test_initial_kernels_of_every_kind_have_flaxs_initial_statistics(test_config):
  # configs/unet_objects.py has every kernel kind the models use: convolutions,
  # transposed convolutions, dense layers and the attention block's
  # DenseGeneral kernels (q/k/v [c, heads, head_dim], whose fan-in is c alone,
  # and out [heads, head_dim, c]). Each kernel is scaled by its spread under
  # flax's own `model.init` (mean variance over other keys), so no fan-in rule
  # is restated here; the scaled values are pooled per kind.
  config = test_config("unet_objects")
  ours = _kernels(state_lib.create_state(config, train_step.make_optimizer(config, 1)).params)
  model = models.make_model(config)
  keys = jax.random.split(jax.random.key(config.seed + 1), _REFERENCE_DRAWS)
  # Kernels do not depend on the image size: the smallest input the net takes.
  small = jnp.zeros((1, 2**config.model.depth, 2**config.model.depth,
                     models.input_shape(config)[-1]))
  draws = jax.jit(jax.vmap(lambda k: model.init(k, small, train=False)["params"]))(keys)
  theirs = _kernels(draws)
  assert ours.keys() == theirs.keys()
  pooled: dict[str, list[np.ndarray]] = {}
  reference_max: dict[str, float] = {}
  for path, kernel in ours.items():
    assert kernel.shape == theirs[path].shape[1:], path
    sigma = math.sqrt(np.mean(theirs[path].reshape(_REFERENCE_DRAWS, -1).var(axis=1)))
    kind = _kernel_kind(path)
    pooled.setdefault(kind, []).append(kernel.ravel() / sigma)
    reference_max[kind] = max(reference_max.get(kind, 0.0), np.abs(theirs[path]).max() / sigma)
  assert set(pooled) == {"conv", "transposed conv", "dense", "attention q/k/v (DenseGeneral)",
                         "attention out (DenseGeneral)"}
  off = {}
  for kind, values in pooled.items():
    z = np.concatenate(values)
    # The relative standard error of a sample's standard deviation is at most
    # 1 / sqrt(2 n) for a normal (a truncated normal's lighter tails make it
    # smaller), and the reference's spread, from 8x as many values, adds an
    # eighth of that variance; 5 such errors. The smallest kind has n > 2e4:
    # under 4%, while a fan-in off by the number of heads (4) halves the spread.
    margin = 5 * math.sqrt((1 + 1 / _REFERENCE_DRAWS) / (2 * z.size))
    if not (abs(z.std() - 1) < margin  # spread
            and abs(z.mean()) < 5 / math.sqrt(z.size)  # 5 standard errors of the mean
            and np.abs(z).max() <= reference_max[kind] * (1 + margin)):  # flax truncates
      off[kind] = (float(z.std()), float(z.mean()), float(np.abs(z).max()))
  assert not off, f"kernels unlike flax's (std, mean, max of kernel / flax's spread): {off}"


def test_initial_state_is_reproducible_from_its_seed(test_config):
  config = test_config("unet_rgb")
  tx = train_step.make_optimizer(config, 1)
  first, again = state_lib.create_state(config, tx), state_lib.create_state(config, tx)
  config.seed += 1
  other = state_lib.create_state(config, tx)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first),
                                                  jax.tree.leaves(again)))
  kernel = lambda s: np.asarray(s.params["output"]["kernel"])
  assert not np.array_equal(kernel(first), kernel(other))
  for path, x in jax.tree_util.tree_leaves_with_path(
      {"params": first.params, "batch_stats": first.batch_stats}):
    name = getattr(path[-1], "key", str(path[-1]))
    if name in ("bias", "mean"):
      assert not np.asarray(x).any(), path
    elif name in ("scale", "var"):
      assert (np.asarray(x) == 1).all(), path


def test_abstract_state_is_what_a_checkpoint_restores_into(test_config):
  config = test_config("unet_rgb")
  tx = train_step.make_optimizer(config, 1)
  abstract = state_lib.abstract_state(config, tx)
  fresh = state_lib.create_state(config, tx)
  assert jax.tree.structure(abstract) == jax.tree.structure(fresh)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  assert ([(x.shape, x.dtype) for x in jax.tree.leaves(abstract)]
          == [(np.shape(x), np.asarray(x).dtype) for x in jax.tree.leaves(fresh)])


# --- data parallelism: 4 devices equal 1 ------------------------------------


def _state(npz):
  return {k: npz[k] for k in npz.files if k.startswith(".")}


def test_data_parallel_run_has_the_devices_it_asked_for(data_parallel_run):
  for devices in (1, 4):
    with np.load(data_parallel_run(devices, float64=True).npz) as npz:
      assert int(npz["device_count"]) == devices
      assert bool(npz["replicated"])  # the state is one global, replicated array
      assert npz[".params['output']['kernel']"].dtype == np.float64


# Tolerances, derived rather than measured, so that they hold on any CPU:
# - The state is computed in float64 (unit roundoff 2**-53 = 1.1e-16); the two
#   device counts differ only in the order of their sums. Even amplified a
#   million-fold (BatchNorm's E[x^2] - E[x]^2 on near-constant channels
#   amplifies it most) that stays below 1e-9 on values of order 1. (Measured
#   here: 1.8e-15.) A BatchNorm statistic over one device's quarter of the batch,
#   a loss not averaged over devices or a lost update move them by 1e-4 or more.
_STATE_ATOL = 1e-9
# - The loss is a float32 mean (losses.py computes in float32) of N terms; any
#   summation order is within N * 2**-24 of the exact sum, relatively, for
#   non-negative terms. N = 8 images x 48 x 64 pixels.
_LOSS_RTOL = 8 * 48 * 64 * 2.0**-24  # 1.5e-3; a loss over a quarter batch differs more


def test_four_devices_step_like_one_device_over_the_same_global_batch(data_parallel_run):
  # unet_gray:test, so the cross-device parts are all exercised: the pmean'd
  # loss, BatchNorm statistics over the global batch, and the gray/colour
  # counts of the weighted loss summed over devices. Three steps, each on the
  # state the previous one left. In float64 (see data_parallel_run).
  with (np.load(data_parallel_run(1, float64=True).npz) as one,
        np.load(data_parallel_run(4, float64=True).npz) as four):
    assert len(one["metrics/loss"]) == 3
    np.testing.assert_allclose(four["metrics/loss"], one["metrics/loss"], rtol=_LOSS_RTOL)
    # The gradient is float64: its norm carries the state's tolerance.
    np.testing.assert_allclose(four["metrics/grad_norm"], one["metrics/grad_norm"],
                               rtol=_STATE_ATOL)
    single, parallel = _state(one), _state(four)
  assert single.keys() == parallel.keys()
  assert any("batch_stats" in k for k in single)
  for key, value in single.items():
    np.testing.assert_allclose(parallel[key], value, atol=_STATE_ATOL, rtol=0, err_msg=key)
  assert int(single[".step"]) == 3
