"""The train step kept between runs (clevr_jax/step_cache.py)."""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clevr_jax import batch as batch_lib
from clevr_jax import state as state_lib
from clevr_jax import step_cache
from clevr_jax import train_step
from clevr_jax.data import pipeline


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)  # the steps donate their state


def _counting(jitted, traces):
  """`jitted` behind a jit whose Python body counts its traces."""
  def body(*args):
    traces.append(1)
    return jitted(*args)
  return jax.jit(body, donate_argnums=(0,))


def test_the_training_loop_keeps_its_step_which_is_the_jitted_step_bit_for_bit(
    test_config):
  # The `:test` preset turns the reuse off (see defaults.py); the quick and full
  # presets leave it on. The suite's compilation cache is a local directory.
  config = test_config("unet_gray")
  config.model.depth, config.model.base_width = 1, 4
  config.reuse_traced_steps = True
  folder = step_cache.directory()
  assert folder is not None
  mesh = state_lib.make_mesh()
  model = state_lib.make_model(config, axis_name=state_lib.AXIS)
  tx = state_lib.make_optimizer(config, 8)
  state = state_lib.replicate(state_lib.create_state(config, tx), mesh)
  batch = batch_lib.to_global(next(pipeline.Split(config, "train").train_batches(
      0, fields=batch_lib.fields(config, "train"))), mesh)
  # The key holds the shardings: those of the copies the steps below are given.
  path = pathlib.Path(folder, step_cache.key("train_step", config, (_copy(state), batch, {})))
  step = train_step.make_train_step(config, model, tx, mesh)

  def two_steps(step):
    s, history = _copy(state), []
    for _ in range(2):
      s, metrics = step(s, batch, {})
      history.append(metrics)
    return s, history

  kept = two_steps(step)  # written (or read, if the cache held it already)
  assert path.is_file()
  traces = []
  read = two_steps(step_cache.cached(_counting(step.jitted, traces), "train_step", config,
                                     (0,), folder=folder))
  assert not traces  # read back: not traced
  # The exported program is the jitted step's own lowering: the same program.
  expected = two_steps(step.jitted)
  for result in (kept, read):
    assert jax.tree.structure(result) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _toy_step(state, batch):
  return {"w": state["w"] + batch.sum()}, {"total": batch.sum(), "mean": batch.mean()}


def _toy_config(test_config, seed=0):
  config = test_config("unet_rgb")
  config.seed = seed
  return config


def test_another_config_or_shape_is_traced_and_kept_under_another_name(
    test_config, tmp_path):
  traces = []
  for config, n in [(_toy_config(test_config), 4), (_toy_config(test_config, 1), 4),
                    (_toy_config(test_config), 5)]:
    step = step_cache.cached(_counting(jax.jit(_toy_step), traces), "toy", config, (0,),
                             folder=str(tmp_path))
    state, metrics = step({"w": jnp.zeros(())}, jnp.arange(n, dtype=jnp.float32))
    total = n * (n - 1) / 2
    assert float(state["w"]) == float(metrics["total"]) == total
    assert float(metrics["mean"]) == total / n
  assert len(traces) == 3
  assert len(list(tmp_path.iterdir())) == 3


def test_a_damaged_file_is_traced_again_and_replaced(test_config, tmp_path, caplog):
  config, traces = _toy_config(test_config), []
  args = ({"w": jnp.ones(())}, jnp.arange(3, dtype=jnp.float32))
  step_cache.cached(jax.jit(_toy_step), "toy", config, (0,), folder=str(tmp_path))(
      *_copy(args))
  (path,) = tmp_path.iterdir()
  path.write_bytes(b'["mean", "total"]\nnot a serialized program')
  with caplog.at_level(logging.WARNING):
    state, _ = step_cache.cached(_counting(jax.jit(_toy_step), traces), "toy", config, (0,),
                                 folder=str(tmp_path))(*_copy(args))
  assert float(state["w"]) == 4.0
  assert len(traces) == 1
  assert "Could not read the exported step" in caplog.text
  traces.clear()  # the rewritten file is read back
  step_cache.cached(_counting(jax.jit(_toy_step), traces), "toy", config, (0,),
                    folder=str(tmp_path))(*_copy(args))
  assert not traces


def test_a_step_of_another_shape_of_result_is_not_kept(test_config, tmp_path):
  step = step_cache.cached(jax.jit(lambda s, b: s + b), "other", _toy_config(test_config),
                           folder=str(tmp_path))
  assert float(step(jnp.ones(()), jnp.ones(()))) == 2.0
  assert not list(tmp_path.iterdir())


def test_a_step_that_cannot_be_exported_runs_as_jitted(test_config, tmp_path, caplog):
  def with_host_callback(state, batch):  # jax.export cannot serialise host callbacks
    w = jax.pure_callback(lambda x: np.asarray(x) + 1, jax.ShapeDtypeStruct((), jnp.float32),
                          state["w"])
    return {"w": w}, {"total": batch.sum()}

  with caplog.at_level(logging.WARNING):
    state, metrics = step_cache.cached(jax.jit(with_host_callback), "callback",
                                       _toy_config(test_config), (0,), folder=str(tmp_path))(
                                           {"w": jnp.zeros(())}, jnp.ones(3))
  assert float(state["w"]) == 1.0 and float(metrics["total"]) == 3.0
  assert "Could not export the step callback" in caplog.text
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cache_dir, expected", [
    ("", None), ("gs://bucket/jax_cache", None), ("/tmp/jax_cache", "/tmp/jax_cache/clevr_jax_steps")])
def test_steps_are_kept_beside_a_local_compilation_cache_only(cache_dir, expected):
  assert step_cache.directory(cache_dir) == expected

