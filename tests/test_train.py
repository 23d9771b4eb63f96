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
import math
import os
import shutil
import signal
import socket

import jax
import numpy as np
from PIL import Image
import pytest

from clevr_jax import guards
from clevr_jax import sharding
from clevr_jax import validate
from clevr_jax.training import checkpoints
from clevr_jax.training import state as state_lib
from clevr_jax.training import train
from clevr_jax.training import train_step as train_step_lib
from tests.helpers.cli_output import error_line
from tests.helpers.early_start import selected_in_module

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_RUN = os.path.join(REPO_ROOT, "tests", "helpers", "train_run.py")
DATA_PARALLEL = os.path.join(REPO_ROOT, "tests", "helpers", "data_parallel.py")
MAIN = ("-m", "clevr_jax.main")
CONFIG_READS = os.path.join(os.path.dirname(__file__), "helpers", "config_reads.py")


def _reject_constant(name):
  raise ValueError(f"not strict JSON: {name}")


def _metrics(workdir):
  """The records of metrics.jsonl, read as strict JSON (NaN/Infinity rejected)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=_reject_constant) for line in f]


def _copy_checkpoints(source, workdir):
  """A workdir with `source`'s checkpoints and metrics.jsonl (the trained run's)."""
  os.makedirs(workdir)
  shutil.copytree(os.path.join(source, "checkpoints"), os.path.join(workdir, "checkpoints"))
  shutil.copy(os.path.join(source, "metrics.jsonl"), workdir)
  return workdir


def _damage(workdir, step, how):
  """What a full disk or a copy cut short leaves: data files cut in half, or no _METADATA."""
  root = os.path.join(workdir, "checkpoints", str(step))
  if how == "truncated":
    files = glob.glob(os.path.join(root, "default", "ocdbt.process_*", "d", "*"))
    assert files
    for path in files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(os.path.join(root, "default", "_METADATA"))


def _restore(config, workdir, step=None):
  """The state of a workdir's checkpoint, as train.py restores it (on one device)."""
  with checkpoints.make_manager(workdir, read_only=True) as manager:
    assert step is None or step in manager.all_steps(), (step, manager.all_steps())
    like = state_lib.abstract_state(config, train_step_lib.make_optimizer(config, 1))
    return checkpoints.restore(manager, like, sharding.make_mesh(), step=step)


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
  with checkpoints.make_manager(workdir, read_only=True) as manager:
    return manager.all_steps()


@pytest.fixture(scope="module")
def _children(tmp_path_factory, start_python, data_dir, trained_workdir, data_parallel_run):
  """The module's child processes, started together; each test waits for its own.

  After trained_workdir: the training child then loads its programs from the
  compilation cache instead of compiling them beside this process.
  """
  data_parallel_run(4, wait=False)  # the checkpoint saved on 4 devices
  tmp = tmp_path_factory.mktemp("train_children")
  killed = str(tmp / "killed")
  test_config = ("--config=configs/unet_rgb.py:test", f"--config.data.data_dir={data_dir}")
  empty_data_dir = tmp / "no_data"
  empty_data_dir.mkdir()
  a_file = tmp / "a_file"
  a_file.write_text("not a directory")
  locked = tmp / "locked"
  locked.mkdir()
  # Held by this (live) process, on this host.
  (locked / guards.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": os.getpid()}))
  all_damaged = _copy_checkpoints(trained_workdir, str(tmp / "all_damaged"))
  # Evaluation restores the network alone, from its arrays (no _METADATA needed):
  # both checkpoints are cut short, so that neither restores.
  _damage(all_damaged, 4, "truncated")
  _damage(all_damaged, 8, "truncated")
  return {
      "killed_workdir": killed,
      "nan_workdir": str(tmp / "nan"),
      "empty_data_dir": str(empty_data_dir),
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
      "no_config_file": start_python([*MAIN, "--config=configs/unet_rbg.py:test"]),
      # Diverges at once; a one-level network (and the faster, non-partitionable
      # random init) compiles in seconds. Checks every step, saves every step.
      "nan": start_python(
          [*MAIN, *test_config, f"--workdir={tmp / 'nan'}", "--config.optimizer.learning_rate=1e9",
           "--config.model.depth=1", "--config.model.base_width=4",
           "--config.eval.taps=('input','output')",
           "--config.log_every_steps=1", "--config.checkpoint_every_steps=1"],
          env={"JAX_THREEFRY_PARTITIONABLE": "false"}),
      "locked": start_python([*MAIN, *test_config, f"--workdir={locked}"]),
      "workdir_is_file": start_python(
          [*MAIN, "--config=configs/unet_rgb.py:test", "--mode=baselines",
           f"--config.data.data_dir={empty_data_dir}", f"--workdir={a_file}"]),
      "workdir_in_file": start_python([*MAIN, *test_config, f"--workdir={a_file}/run"]),
      "all_checkpoints_damaged": start_python(
          [*MAIN, *test_config, "--mode=evaluate", f"--workdir={all_damaged}"]),
      "image_height_50": start_python(
          [*MAIN, "--config=configs/unet_rgb.py:test", f"--config.data.data_dir={empty_data_dir}",
           "--config.data.image_height=50", f"--workdir={tmp / 'h50'}"]),
      "eval_file_is_a_dir": start_python(
          [*MAIN, *test_config, f"--config.data.eval_file={tmp}", f"--workdir={tmp / 'ev1'}"]),
      "prepare_log_all": start_python([*MAIN, *test_config, "--mode=prepare", "--log_all"]),
      "no_real_dataset": start_python([*MAIN, "--config=configs/unet_rgb.py",
                                       "--mode=prepare",
                                       f"--config.data.data_dir={tmp / 'empty'}"]),
      "prepare": start_python([*MAIN, "--config=configs/unet_rgb.py:test", "--mode=prepare",
                               f"--config.data.data_dir={data_dir}"]),
      # Compiled as users compile it: XLA's default flags, not the suite's
      # (conftest.SUITE_XLA_FLAGS), for the train step, K-Means and post-processing.
      # Run through tests/helpers/config_reads.py, which records the config keys it reads.
      "default_xla_flags": start_python(
          [CONFIG_READS, str(tmp / "config_reads.json"), *test_config,
           f"--workdir={tmp / 'default_xla_flags'}",
           "--config.num_epochs=1", "--config.eval.taps=('input','output')",
           "--config.eval.segmenter_names=('kmeans','split_merge_predict_k')"],
          env={"XLA_FLAGS": ""}),
      "default_xla_flags_workdir": str(tmp / "default_xla_flags"),
      "config_reads": str(tmp / "config_reads.json"),
  }


@pytest.fixture(scope="module", autouse=True)
def _start_children(request):
  if selected_in_module(request, "_children"):
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


def test_a_run_compiled_with_default_xla_flags_trains_and_scores(_children):
  result = _children["default_xla_flags"].result()
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = _children["default_xla_flags_workdir"]
  losses = [r["train/loss"] for r in _metrics(workdir) if "train/loss" in r]
  assert losses and all(math.isfinite(v) for v in losses), losses
  with open(os.path.join(workdir, "results.json")) as f:
    scores = json.load(f)["segmenters"]
  assert sorted(scores) == ["kmeans", "split_merge_predict_k"]
  for name, by_tap in scores.items():
    assert sorted(by_tap) == ["input", "output"], name
    for tap, row in by_tap.items():
      assert 0 < row["poster_miou"] <= 1 and -1 <= row["fg_ari"] <= 1, (name, tap, row)


# Settings that a U-Net train-and-evaluate run has no use for: another network's,
# the objectives beyond reconstruction, other modes' (baselines, segment), another
# data source's, and a learning-rate decay the test preset does not schedule.
_OTHER_RECIPES_AND_MODES = ("model.slot_attention.", "objectives.", "data.eval_file",
                            "data.real_config", "data.source", "eval.baselines_seed",
                            "eval.user_segmenter", "optimizer.decay_", "preset")


def test_a_train_and_evaluate_run_reads_every_setting_it_is_given(_children, test_config):
  """A key nothing reads is a setting that silently does nothing. Recorded while
  the run runs (the validation pass, which reads every key to check it, aside):
  each leaf of the config is read, except the other recipes' and modes', and
  every field of each scored segmenter is read."""
  result = _children["default_xla_flags"].result()
  assert result.returncode == 0, result.stderr[-3000:]
  with open(_children["config_reads"]) as f:
    read = set(json.load(f))
  config = test_config("unet_rgb")
  scored = ("kmeans", "split_merge_predict_k")  # the child's eval.segmenter_names
  unread = []
  for path in validate._leaves(config):  # pylint: disable=protected-access
    parts = path.split(".")
    if parts[:2] == ["eval", "segmenters"]:
      if parts[2] in scored and path not in read:
        unread.append(path)
    elif path not in read and not path.startswith(_OTHER_RECIPES_AND_MODES):
      unread.append(path)
  assert not unread, unread
  assert not any(p.startswith("eval.segmenters.hybrid.") for p in read)  # only what is scored


def test_the_network_restores_without_an_optimizer(trained_workdir, test_config, monkeypatch):
  config = test_config("unet_rgb")
  full = _restore(config, trained_workdir)

  def no_optimizer(*args, **kwargs):
    raise AssertionError("restoring the network built an optimizer")

  monkeypatch.setattr(train_step_lib, "make_optimizer", no_optimizer)
  state, _ = checkpoints.restore_model(config, trained_workdir, sharding.make_mesh())
  assert state.opt_state is None and full.opt_state is not None
  _assert_same_state(state.replace(opt_state=None), full.replace(opt_state=None))


def test_training_imports_nothing_from_evaluation(run_python):
  # A child process: here the evaluation may be imported already. With the
  # package blocked, `import clevr_jax.evaluation` (or any of its modules) fails.
  code = ("import sys; sys.modules['clevr_jax.evaluation'] = None\n"
          "import clevr_jax.main, clevr_jax.training.train, clevr_jax.training.checkpoints, "
          "clevr_jax.objects.self_training, clevr_jax.objects.pseudo_masks\n"
          "print(sorted(m for m, module in sys.modules.items()\n"
          "             if m.startswith('clevr_jax.evaluation') and module is not None))")
  result = run_python(["-c", code])
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"


def test_device_resident_run_takes_the_host_gathered_runs_steps(tmp_path, trained_workdir,
                                                                 test_config):
  # One training lane: the device-resident split is sent the positions of the
  # very batches the host gathers, so both runs take the same steps.
  config = test_config("unet_rgb")
  config.data.device_resident = True
  workdir = str(tmp_path / "resident")
  train.train_and_evaluate(config, workdir)
  for step in (4, 8):
    _assert_same_state(_restore(config, workdir, step), _restore(config, trained_workdir, step))


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
  line = error_line(_children["typo"].result())
  assert "--config.model.skipp" in line and 'Did you mean "skip"' in line


def test_cli_unknown_preset_lists_the_presets(_children):
  line = error_line(_children["unknown_preset"].result())
  assert "unknown preset 'quik'" in line
  assert "'quick', 'synthetic', 'test'" in line


def test_cli_missing_config_file_names_it(_children):
  line = error_line(_children["no_config_file"].result())
  assert "configs/unet_rbg.py" in line and "No such file" in line
  assert "--config=configs/unet_rgb.py:quick" in line


def test_cli_without_the_real_dataset_says_how_to_get_it(_children):
  line = error_line(_children["no_real_dataset"].result())
  assert line.startswith("error: no clevr_with_masks TFRecord at")
  for hint in ("clevr_with_masks_train.tfrecords", "--config.data.manual_dir",
               "':synthetic'", "':quick'"):
    assert hint in line, hint


def test_cli_prepare_prints_the_resolved_config(_children, data_dir):
  result = _children["prepare"].result()
  assert result.returncode == 0, result.stderr[-5000:]
  for line in (f"data_dir: {data_dir}", "dataset: synthetic_clevr", "image_height: 48",
               "name: unet_rgb", "preset: test", "batch_size: 8"):
    assert line in result.stdout, line
  assert "'train'" in result.stdout and "num_examples=32" in result.stdout
  # Only the project's lines by default; TFDS's INFO lines come back with --log_all.
  assert "Load dataset info" not in result.stderr, result.stderr[-3000:]
  assert "Using custom data configuration" not in result.stderr
  log_all = _children["prepare_log_all"].result()
  assert log_all.returncode == 0, log_all.stderr[-5000:]
  assert "Load dataset info" in log_all.stderr


# --- guards: divergence, the workdir, damaged checkpoints, bad settings ------------


def test_cli_stops_at_a_non_finite_loss_keeping_the_last_good_checkpoint(_children):
  result = _children["nan"].result()
  line = error_line(result)
  assert "training diverged at step" in line and "--config.optimizer.learning_rate=1e+08" in line
  diverged_at = int(line.split("training diverged at step ")[1].split(":")[0])
  workdir = _children["nan_workdir"]
  # Saved every step up to the last finite state, none after.
  saved = _checkpoint_steps(workdir)
  assert saved and max(saved) < diverged_at, (saved, diverged_at)
  assert f"the checkpoint of step {max(saved)} is the last good state" in line
  # Strict JSON, finite numbers only; nothing logged past the divergence.
  records = _metrics(workdir)
  assert records and all(r["step"] < diverged_at for r in records)
  assert all(math.isfinite(v) for r in records for v in r.values())
  # No evaluation of a diverged run.
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  # The default output: the project's lines, not TFDS's INFO lines nor JAX's libtpu probe.
  assert "step 1/8" in result.stderr
  for noise in ("Load dataset info", "Creating a tf.data.Dataset", "libtpu",
                "Using custom data configuration"):
    assert noise not in result.stderr, noise


def test_cli_second_run_on_a_locked_workdir_names_the_holder(_children):
  line = error_line(_children["locked"].result())
  assert f"host {socket.gethostname()}, pid {os.getpid()}" in line
  assert "another --workdir" in line


def test_cli_workdir_that_cannot_be_written_fails_before_any_work(_children):
  line = error_line(_children["workdir_is_file"].result())
  assert "is a file, not a directory" in line and "--workdir" in line
  # --mode=baselines stopped before it built (or even looked for) any data.
  assert os.listdir(_children["empty_data_dir"]) == []
  line = error_line(_children["workdir_in_file"].result())
  assert "cannot write in --workdir=" in line and "Not a directory" in line


def test_cli_evaluate_with_every_checkpoint_damaged_says_so(_children):
  result = _children["all_checkpoints_damaged"].result()
  line = error_line(result)
  assert "restores" in line and "step 4" in line and "step 8" in line
  # orbax's notes on the read-only manager that evaluation opens are not shown.
  for noise in ("Given directory is read only", "CheckpointManagerOptions.read_only"):
    assert noise not in result.stderr, noise


def test_cli_image_size_the_network_cannot_take_fails_before_rendering(_children):
  line = error_line(_children["image_height_50"].result())
  assert "config.data.image_height=50 is not divisible by 16" in line
  assert "--config.data.image_height=48" in line
  assert os.listdir(_children["empty_data_dir"]) == []  # nothing rendered


def test_cli_eval_file_that_is_a_directory_says_so(_children):
  line = error_line(_children["eval_file_is_a_dir"].result())
  assert "eval_file" in line and "is a directory" in line


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, trained_workdir,
                                                            test_config, caplog):
  # The newest checkpoint (8) cut short: the run warns, naming it, resumes from 4,
  # drops what was logged after step 4, and ends where training straight through did.
  config = test_config("unet_rgb")
  workdir = _copy_checkpoints(trained_workdir, str(tmp_path / "run"))
  _damage(workdir, 8, "truncated")
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, workdir)
  damaged = os.path.join(workdir, "checkpoints", "8")
  assert any(damaged in r.getMessage() and "does not restore" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "8"))  # kept aside
  assert _checkpoint_steps(workdir) == [4, 8]
  _assert_same_state(_restore(config, workdir, 8), _restore(config, trained_workdir, 8))
  # The log agrees with the checkpoints: each step once, in order.
  records = _metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8]
  assert [(r["step"], r["epoch"]) for r in records if "test/loss" in r] == [(4, 1), (8, 2)]


@pytest.mark.parametrize("how", ["truncated", "no_metadata"])
def test_restore_uses_the_newest_checkpoint_that_restores(how, tmp_path, trained_workdir,
                                                          test_config):
  config = test_config("unet_rgb")
  workdir = _copy_checkpoints(trained_workdir, str(tmp_path / "run"))
  _damage(workdir, 8, how)
  _assert_same_state(_restore(config, workdir), _restore(config, trained_workdir, 4))
  _damage(workdir, 4, how)
  with pytest.raises(ValueError, match=r"no checkpoint in .* restores \(step 8: .*step 4: "):
    _restore(config, workdir)


# Restores a workdir whose newest checkpoint is damaged, three times, and prints
# what the garbage collector reported as it went (in a child: the session's own
# collections would spread those reports over later tests).
_RESTORE_DAMAGED = """
import gc, json, sys, time
left = []
sys.unraisablehook = lambda u: left.append(f"{u.exc_value!r} in {u.object!r}"[:300])
from clevr_jax import defaults, sharding
from clevr_jax.training import checkpoints, state, train_step
config = defaults.get_config("test")
like = state.abstract_state(config, train_step.make_optimizer(config, 1))
for _ in range(3):
  with checkpoints.make_manager(sys.argv[1], read_only=True) as manager:
    _, damaged = checkpoints.restore_newest(manager, like, sharding.make_mesh())
  time.sleep(0.5)  # TensorStore's reads end on their own threads
  gc.collect()
print(json.dumps({"damaged": damaged, "left": left}))
"""


def test_a_damaged_checkpoint_leaves_no_read_behind(tmp_path, trained_workdir, run_python):
  # orbax reads the arrays side by side; when one read fails, the others must be
  # awaited, not left on a closed event loop for the garbage collector to report.
  workdir = _copy_checkpoints(trained_workdir, str(tmp_path / "run"))
  _damage(workdir, 8, "truncated")
  result = run_python(["-c", _RESTORE_DAMAGED, workdir])
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["damaged"] == [8]
  assert out["left"] == [], (len(out["left"]), out["left"][:3])


def test_run_stopped_between_its_last_checkpoint_and_evaluation_evaluates_on_resume(
    tmp_path, monkeypatch, trained_workdir, test_config):
  # As if killed right after the epoch's final save: no test loss, no preview.
  config = test_config("unet_rgb")
  workdir = str(tmp_path / "run")

  def killed(*args, **kwargs):
    raise SystemExit("killed")

  monkeypatch.setattr(train, "evaluate_epoch", killed)
  with pytest.raises(SystemExit):
    train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert _checkpoint_steps(workdir) == [4]
  assert not [r for r in _metrics(workdir) if "test/loss" in r]
  assert not os.path.exists(os.path.join(workdir, "previews", "epoch_001.png"))

  train.train_and_evaluate(config, workdir)
  records = _metrics(workdir)
  tests = [(r["step"], r["epoch"], r["test/loss"]) for r in records if "test/loss" in r]
  straight = [(r["step"], r["epoch"], r["test/loss"]) for r in _metrics(trained_workdir)
              if "test/loss" in r]
  assert [t[:2] for t in tests] == [(4, 1), (8, 2)]
  np.testing.assert_allclose([t[2] for t in tests], [t[2] for t in straight], rtol=1e-6)
  assert os.path.exists(os.path.join(workdir, "previews", "epoch_001.png"))
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8]


@pytest.mark.slow  # trains
def test_state_that_turns_non_finite_between_log_steps_is_never_saved(
    tmp_path, monkeypatch, test_config):
  # The update of step 6 poisons the parameters; the loss logged at step 6 was
  # computed before it and is finite. The check before the save of step 6
  # stops the run, keeping the last finite checkpoint (4, the epoch's end).
  config = test_config("unet_rgb")
  config.checkpoint_every_steps = 3
  workdir = str(tmp_path / "run")
  make_train_step = train_step_lib.make_train_step

  def poisoned_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step(state, batch, data=None):
      state, metrics = train_step(state, batch, data)
      if int(state.step) >= 6:
        state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
      return state, metrics
    return step

  monkeypatch.setattr(train_step_lib, "make_train_step", poisoned_train_step)
  with pytest.raises(train.TrainingDiverged,
                     match=r"at step 6: the parameters .* not finite.*step 4 is the last"):
    train.train_and_evaluate(config, workdir)
  assert _checkpoint_steps(workdir) == [3, 4]
  assert [r["step"] for r in _metrics(workdir) if "train/loss" in r] == [2, 4, 6]
