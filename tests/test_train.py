"""Tests of the training loop, its checkpoints and the command line.

Resuming is checked against `trained_workdir` (unet_rgb:test trained straight
through: 2 epochs of 4 steps, checkpoints of steps 4 and 8): runs stopped
part-way must end with the same state. They run the same programs (the
session's compilation cache, see conftest.py), so the states are equal bit for
bit. Child processes are used only where they must: a SIGKILL, other device
counts, the command line. They all start with the module (`_children`) and
overlap with the tests that run in this process.
"""

import glob
import json
import os
import signal

import jax
import numpy as np
from PIL import Image
import pytest

from clevr_jax import checkpoints
from clevr_jax import state as state_lib
from clevr_jax import train
from clevr_jax import train_step as train_step_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_RUN = os.path.join(REPO_ROOT, "tests", "helpers", "train_run.py")
DATA_PARALLEL = os.path.join(REPO_ROOT, "tests", "helpers", "data_parallel.py")
MAIN = ("-m", "clevr_jax.main")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _restore(config, workdir, step=None):
  """The state of a workdir's checkpoint, as train.py restores it (on one device)."""
  manager = checkpoints.make_manager(workdir, read_only=True)
  assert step is None or step in manager.all_steps(), (step, manager.all_steps())
  return checkpoints.restore(manager, state_lib.abstract_state(config), state_lib.make_mesh(),
                             step=step)


def _assert_same_state(actual, expected):
  a_leaves, a_tree = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves, e_tree = jax.tree_util.tree_flatten_with_path(expected)
  assert a_tree == e_tree
  for (path, a), (_, e) in zip(a_leaves, e_leaves):
    # Equal bit for bit in practice; 1e-6 leaves room for a compiler that
    # reorders a sum, while a wrong batch or a lost update moves them by ~1e-3.
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def _train_args(config_name, data_dir, workdir, *extra):
  return [TRAIN_RUN, f"--config={REPO_ROOT}/configs/{config_name}.py:test",
          f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", *extra]


def _checkpoint_steps(workdir):
  return checkpoints.make_manager(workdir, read_only=True).all_steps()


@pytest.fixture(scope="module")
def _children(tmp_path_factory, start_python, data_dir, trained_workdir, data_parallel_run):
  """The module's child processes, started together; each test waits for its own.

  After trained_workdir: the training child then loads its programs from the
  compilation cache instead of compiling them beside this process.
  """
  del trained_workdir
  data_parallel_run(4, wait=False)  # the checkpoint saved on 4 devices
  tmp = tmp_path_factory.mktemp("train_children")
  killed = str(tmp / "killed")
  return {
      "killed_workdir": killed,
      # A first save at step 3: mid-epoch (4 steps per epoch).
      "killed": start_python(_train_args("unet_rgb", data_dir, killed,
                                         "--config.checkpoint_every_steps=3",
                                         "--kill_after_first_save")),
      "batch_10_on_4_devices": start_python(
          _train_args("unet_rgb", data_dir, str(tmp / "batch10"), "--config.batch_size=10"),
          devices=4),
      "typo": start_python([*MAIN, "--config=configs/unet_rgb.py:test",
                            "--config.model.skipp=1"]),
      "unknown_preset": start_python([*MAIN, "--config=configs/unet_rgb.py:quik"]),
      "no_real_dataset": start_python([*MAIN, "--config=configs/unet_rgb.py",
                                       "--mode=prepare",
                                       f"--config.data.data_dir={tmp / 'empty'}"]),
      "prepare": start_python([*MAIN, "--config=configs/unet_rgb.py:test", "--mode=prepare",
                               f"--config.data.data_dir={data_dir}"]),
  }


@pytest.fixture(scope="module", autouse=True)
def _start_children(request):
  if any("_children" in item.fixturenames and item.module is request.module
         for item in request.session.items):
    request.getfixturevalue("_children")


# --- what a run leaves in its workdir ----------------------------------------


def test_workdir_has_metrics_tensorboard_previews_and_checkpoints(trained_workdir):
  records = _metrics(trained_workdir)
  train_steps = [r["step"] for r in records if "train/loss" in r]
  test_records = [r for r in records if "test/loss" in r]
  assert train_steps == [2, 4, 6, 8]  # log_every_steps=2
  assert [(r["step"], r["epoch"]) for r in test_records] == [(4, 1), (8, 2)]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert all(np.isfinite(r["test/loss"]) for r in test_records)

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  events = glob.glob(os.path.join(trained_workdir, "tensorboard", "events.out.tfevents.*"))
  assert events
  tags = {value.tag for path in events for event in tf.compat.v1.train.summary_iterator(path)
          for value in event.summary.value}
  assert {"train/loss", "test/loss", "train/images_per_second"} <= tags

  previews = sorted(glob.glob(os.path.join(trained_workdir, "previews", "*.png")))
  assert [os.path.basename(p) for p in previews] == ["epoch_001.png", "epoch_002.png"]
  for path in previews:
    with Image.open(path) as image:
      assert image.width > 0 and image.height > 0

  assert _checkpoint_steps(trained_workdir) == [4, 8]  # checkpoint_every_steps=4


# --- resuming ------------------------------------------------------------------


def test_interrupted_mid_epoch_then_resumed_equals_training_straight(
    tmp_path, monkeypatch, trained_workdir, test_config):
  # 2 steps, Ctrl-C, restore, the rest: step 2 is mid-epoch (4 steps per
  # epoch), so the resumed run must also skip the batches the first one used.
  config = test_config("unet_rgb")
  workdir = str(tmp_path / "run")
  make_train_step = train_step_lib.make_train_step

  def interrupting_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step(state, batch, data=None):
      # Before the call, as when Ctrl-C lands while the next batch is read:
      # the state has not been donated to the step yet.
      if int(state.step) == 2:
        raise KeyboardInterrupt
      return train_step(state, batch, data)
    return step

  monkeypatch.setattr(train_step_lib, "make_train_step", interrupting_train_step)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  assert _checkpoint_steps(workdir) == [2]  # train.py saved before re-raising
  monkeypatch.undo()

  train.train_and_evaluate(config, workdir)
  for step in (4, 8):  # N = 4 as 2 + 2, and on through the next epoch
    _assert_same_state(_restore(config, workdir, step), _restore(config, trained_workdir, step))
  # The resumed run logs on from where the first stopped, and evaluates each epoch once.
  records = _metrics(workdir)
  assert [r["step"] for r in records if "test/loss" in r] == [4, 8]
  straight = [(r["step"], r["train/loss"]) for r in _metrics(trained_workdir) if "train/loss" in r]
  assert [(r["step"], r["train/loss"]) for r in records if "train/loss" in r] == straight


def test_run_killed_after_its_first_save_resumes_from_it(_children, trained_workdir, test_config):
  killed = _children["killed"].result()
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-5000:]
  workdir = _children["killed_workdir"]
  assert _checkpoint_steps(workdir) == [3]
  config = test_config("unet_rgb")
  config.checkpoint_every_steps = 3
  train.train_and_evaluate(config, workdir)
  assert _checkpoint_steps(workdir)[-1] == 8
  _assert_same_state(_restore(config, workdir), _restore(config, trained_workdir, 8))
  # Logged before the kill (step 2), then after the resume (4, 6, 8): no step twice.
  assert [r["step"] for r in _metrics(workdir) if "train/loss" in r] == [2, 4, 6, 8]


def test_checkpoint_saved_on_four_devices_restores_on_one_and_two(
    tmp_path, run_python, data_parallel_run, test_config):
  saved_on_four = data_parallel_run(4)
  with np.load(saved_on_four.npz) as npz:
    assert int(npz["device_count"]) == 4
    expected = {k: npz[k] for k in npz.files if k.startswith(".")}
  assert int(expected[".step"]) == 3  # trained, with optimizer moments to restore

  # One device: this process.
  config = test_config("unet_gray")
  state = _restore(config, saved_on_four.checkpoint_dir)
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  assert {jax.tree_util.keystr(p) for p, _ in leaves} == expected.keys()
  for path, value in leaves:
    np.testing.assert_array_equal(np.asarray(value), expected[jax.tree_util.keystr(path)])

  # Two devices: a child, replicating the state over both.
  out = str(tmp_path / "two.npz")
  result = run_python([DATA_PARALLEL, f"--config={REPO_ROOT}/configs/unet_gray.py:test",
                       f"--restore={saved_on_four.checkpoint_dir}", f"--out={out}"], devices=2)
  assert result.returncode == 0, result.stderr[-5000:]
  with np.load(out) as npz:
    assert int(npz["device_count"]) == 2 and bool(npz["replicated"])
    restored = {k: npz[k] for k in npz.files if k.startswith(".")}
  assert restored.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(restored[key], value, err_msg=key)


# --- clear errors ----------------------------------------------------------------


def test_batch_that_does_not_divide_over_the_devices_names_the_flag(_children):
  result = _children["batch_10_on_4_devices"].result()
  assert result.returncode != 0
  assert "ValueError: the global batch 10 does not divide over 4 devices" in result.stderr
  assert "--config.batch_size=8 or 12" in result.stderr


def test_cli_config_typo_names_the_key(_children):
  result = _children["typo"].result()
  assert result.returncode != 0
  assert "skipp" in result.stderr
  assert 'Did you mean "skip"' in result.stderr


def test_cli_unknown_preset_lists_the_presets(_children):
  result = _children["unknown_preset"].result()
  assert result.returncode != 0
  assert "unknown preset 'quik'" in result.stderr
  assert "'quick', 'synthetic', 'test'" in result.stderr


def test_cli_without_the_real_dataset_says_how_to_get_it(_children):
  result = _children["no_real_dataset"].result()
  assert result.returncode == 2
  assert "error: no clevr_with_masks TFRecord at" in result.stderr
  for hint in ("clevr_with_masks_train.tfrecords", "--config.data.manual_dir",
               "':synthetic'", "':quick'"):
    assert hint in result.stderr, hint
  assert "Traceback" not in result.stderr


def test_cli_prepare_prints_the_resolved_config(_children, data_dir):
  result = _children["prepare"].result()
  assert result.returncode == 0, result.stderr[-5000:]
  for line in (f"data_dir: {data_dir}", "dataset: synthetic_clevr", "image_height: 48",
               "name: unet_rgb", "preset: test", "batch_size: 8"):
    assert line in result.stdout, line
  assert "'train'" in result.stdout and "num_examples=32" in result.stdout
