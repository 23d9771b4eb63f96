"""Bad input and faults as a user meets them: one `error:` line (exit 2), one
`interrupted:` line after Ctrl-C (exit 130), no traceback, nothing lost.

The command-line cases run `python -m clevr_jax.main` with the `:test` presets;
they start together with the module (`_children`) and most stop in the
validation pass, before any data is read. The other cases (segment outputs,
16-bit images, the validation pass) run in this process.
"""

import gzip
import json
import os
import pathlib
import re
import shutil

import numpy as np
from PIL import Image
import pytest

from clevr_jax import defaults
from clevr_jax import validate
from tests.helpers.cli_output import error_line
from tests.helpers.early_start import selected_in_module

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(REPO_ROOT, "tests", "helpers")
MAIN = ("-m", "clevr_jax.main")
SAMPLES = pathlib.Path(REPO_ROOT) / "tests" / "data" / "clevr_with_masks_samples"


def _bad_eval_files(tmp: pathlib.Path) -> dict[str, str]:
  """The real samples in the official format, then damaged four ways."""
  from clevr_jax import schema  # pylint: disable=g-import-not-at-top
  from clevr_jax.data import official  # pylint: disable=g-import-not-at-top  (TensorFlow)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records = []
  for path in sorted(SAMPLES.glob("sample_*.npz")):  # image and masks; the rest zeros
    record = {name: np.zeros(schema.MAX_SLOTS, np.float32) for name in schema.FLOAT_FEATURES}
    record.update({name: np.zeros(schema.MAX_SLOTS, np.uint8)
                   for name in schema.CODE_FEATURES})
    record["pixel_coords"] = np.zeros((schema.MAX_SLOTS, 3), np.float32)
    with np.load(path) as sample:
      record["image"], record["mask"] = sample["image"], sample["mask"]
    records.append(record)
  valid = tmp / "valid.tfrecords"
  official.write_records(str(valid), records)
  files = {"uncompressed": tmp / "plain.tfrecords", "png": tmp / "image.tfrecords",
           "gzip_of_text": tmp / "text.tfrecords", "cut_in_first_record": tmp / "cut.tfrecords"}
  with tf.io.TFRecordWriter(str(files["uncompressed"])) as writer:
    for record in records:
      writer.write(official.serialize_record(record))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(files["png"], format="PNG")
  files["gzip_of_text"].write_bytes(gzip.compress(b"not a record\n" * 100))
  files["cut_in_first_record"].write_bytes(valid.read_bytes()[:3000])
  return {name: str(path) for name, path in files.items()}


# `python -m clevr_jax.main` under a file size limit: a write past it fails (EFBIG)
# as on a full disk. (Python ignores SIGXFSZ, so the write fails, the process lives.)
_MAIN_ON_A_FULL_DISK = """
import resource, runpy, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "clevr_jax.main"
runpy.run_module("clevr_jax.main", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def _children(tmp_path_factory, start_python, data_dir, trained_workdir):
  tmp = tmp_path_factory.mktemp("cli_errors")
  test = ("--config=configs/unet_rgb.py:test", f"--config.data.data_dir={data_dir}")

  def main(*args, devices=None, env=None):
    return start_python([*MAIN, *test, *args], devices=devices, env=env)

  def workdir_with_checkpoints(name):
    workdir = tmp / name
    workdir.mkdir()
    shutil.copytree(os.path.join(trained_workdir, "checkpoints"), workdir / "checkpoints")
    shutil.copy(os.path.join(trained_workdir, "metrics.jsonl"), workdir)
    return str(workdir)

  children = {}
  for name, path in _bad_eval_files(tmp).items():
    children[f"eval_file_{name}"] = main("--mode=baselines", f"--config.data.eval_file={path}",
                                         f"--workdir={tmp / name}")
  children["eval_file_evaluate"] = main(
      "--mode=evaluate", f"--config.data.eval_file={tmp / 'text.tfrecords'}",
      f"--workdir={workdir_with_checkpoints('evaluate_text')}")
  children["batch_0"] = main("--config.batch_size=0", f"--workdir={tmp / 'b0'}")
  children["batch_minus_8"] = main("--config.batch_size=-8", f"--workdir={tmp / 'b8'}")
  children["eval_batch_0"] = main("--mode=baselines", "--config.eval.batch_size=0",
                                  f"--workdir={tmp / 'eb0'}")
  for mode in ("baselines", "evaluate"):
    children[f"eval_batch_6_on_4_{mode}"] = main(
        f"--mode={mode}", "--config.eval.batch_size=6", f"--workdir={tmp / ('e6' + mode)}",
        devices=4)
  children["region_slots_4"] = main("--mode=baselines", "--config.eval.max_regions=4",
                                    f"--workdir={tmp / 'r4'}")
  children["no_such_platform"] = main("--mode=baselines", f"--workdir={tmp / 'platform'}",
                                      env={"JAX_PLATFORMS": "gpu"})
  children["key_elsewhere"] = main("--config.eval.kmeans.metric=euclidean", f"--workdir={tmp / 'k'}")
  children["no_config_file_with_override"] = start_python(
      [*MAIN, "--config=configs/unet_rbg.py:test", "--config.batch_size=4"])
  cut = tmp / "cut_results"
  cut.mkdir()
  (cut / "results.json").write_text('{"name": "unet_rgb", "segmenters": {"kmeans": {"inp')
  children["report_cut_json"] = start_python(
      [*MAIN, "--config=configs/unet_rgb.py:test", "--mode=report", f"--workdirs={cut}",
       f"--output_dir={tmp / 'report'}"])
  for mode in ("train", "evaluate"):
    children[f"wider_{mode}"] = main(f"--mode={mode}", "--config.model.base_width=16",
                                     f"--workdir={workdir_with_checkpoints('wider_' + mode)}")
  # A third epoch saves step 12; its files exceed the limit (the checkpoints are
  # about 5 MB, the log lines and metrics a few KB).
  full = workdir_with_checkpoints("full_disk")
  children["full_disk_workdir"] = full
  children["full_disk"] = start_python(
      ["-c", _MAIN_ON_A_FULL_DISK, 2**20, *test, f"--workdir={full}", "--config.num_epochs=3",
       "--config.eval.taps=('input',)"])
  interrupted = str(tmp / "interrupted")
  children["interrupted_workdir"] = interrupted
  children["interrupted"] = start_python(
      [os.path.join(HELPERS, "interrupted_main.py"), *test, f"--workdir={interrupted}",
       "--config.num_epochs=1", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=100"],
      env={"CLEVR_JAX_TEST_INTERRUPT_AT_STEP": "2"})
  return children


@pytest.fixture(scope="module", autouse=True)
def _start_children(request):
  if selected_in_module(request, "_children"):
    request.getfixturevalue("_children")


# --- the data an evaluation reads --------------------------------------------------


@pytest.mark.parametrize("name", ["uncompressed", "png", "gzip_of_text", "cut_in_first_record"])
def test_eval_file_that_is_not_a_gzip_tfrecord_is_named(_children, name):
  line = error_line(_children[f"eval_file_{name}"].result())
  assert ".tfrecords" in line
  if name in ("uncompressed", "png"):
    assert "not GZIP-compressed" in line
  else:
    assert "record 0 is truncated or corrupt" in line


def test_evaluate_names_an_eval_file_that_is_not_a_tfrecord(_children):
  line = error_line(_children["eval_file_evaluate"].result())
  assert "text.tfrecords: record 0 is truncated or corrupt" in line


# --- the config ------------------------------------------------------------------


def test_batch_sizes_of_zero_or_less_name_the_setting(_children):
  for child, flag in (("batch_0", "batch_size=0"), ("batch_minus_8", "batch_size=-8"),
                      ("eval_batch_0", "eval.batch_size=0")):
    line = error_line(_children[child].result())
    assert f"config.{flag} must be at least 1" in line, line


@pytest.mark.parametrize("mode", ["baselines", "evaluate"])
def test_eval_batch_that_does_not_divide_over_the_devices_names_the_flag(_children, mode):
  line = error_line(_children[f"eval_batch_6_on_4_{mode}"].result())
  assert "the global batch 6 does not divide over 4 devices" in line
  assert "--config.eval.batch_size=4 or 8" in line


def test_region_slots_fewer_than_a_segmenters_clusters_name_the_field(_children):
  line = error_line(_children["region_slots_4"].result())
  assert ("config.eval.max_regions=4 region slots are fewer than the 11 clusters "
          "segmenter 'split_merge' splits into regions") in line, line
  assert "--config.eval.max_regions=11 or more" in line


def test_a_jax_platform_the_machine_lacks_is_named(_children):
  line = error_line(_children["no_such_platform"].result())
  assert "JAX cannot start a backend" in line
  assert "JAX_PLATFORMS='gpu' names none this machine has" in line


def test_a_key_of_another_section_names_where_that_key_is(_children):
  line = error_line(_children["key_elsewhere"].result())
  assert "--config.eval.kmeans.metric: the config has no key 'metric'" in line
  assert "--config.eval.segmenters.kmeans.metric" in line


def test_missing_config_file_with_an_override_names_the_file(_children):
  line = error_line(_children["no_config_file_with_override"].result())
  assert "cannot load the config file 'configs/unet_rbg.py' (No such file" in line


def test_validation_names_the_field_to_fix():
  config = defaults.get_config("test")
  validate.check_config(config, "train", (1, 1))
  for path, value, expected in (("num_epochs", 0, "config.num_epochs=0 must be at least 1"),
                                ("checkpoint_every_steps", -1, "checkpoint_every_steps=-1"),
                                ("eval.segmenters.kmeans_fixed_k.fixed_k", 0,
                                 "eval.segmenters.kmeans_fixed_k.fixed_k=0 must be"),
                                ("eval.segmenters.split_merge_predict_k.shape_split_waist",
                                 1.5, "split_merge_predict_k.shape_split_waist=1.5 must be in"),
                                ("eval.segmenters.split_merge_predict_k.refine_steps", 51,
                                 "split_merge_predict_k.refine_steps=51 must be in"),
                                ("data.synthetic.zoom", 0.0,
                                 "config.data.synthetic.zoom=0.0 must be in"),
                                ("eval.max_regions", 0, "eval.max_regions=0 must be"),
                                ("eval.max_regions", 10, "eval.max_regions=10 region slots"),
                                ("task", "segment", "config.task='segment'")):
    bad = defaults.get_config("test")
    node = bad
    for key in path.split(".")[:-1]:
      node = node[key]
    node[path.split(".")[-1]] = value
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
      validate.check_config(bad, "train")


def _set(config, path, value):
  node = config
  for key in path.split(".")[:-1]:
    node = node[key]
  with config.unlocked():
    node[path.split(".")[-1]] = value


@pytest.mark.parametrize("config_name, mode, path, value, expected", [
    # Thresholds: NaN would merge everything (every `<` is False), a negative one nothing.
    ("unet_objects", "evaluate", "eval.segmenters.hybrid.merge_threshold", float("nan"),
     "config.eval.segmenters.hybrid.merge_threshold=nan must be a finite number"),
    ("unet_objects", "evaluate", "eval.segmenters.hybrid.tap_merge_threshold", -1.0,
     "config.eval.segmenters.hybrid.tap_merge_threshold=-1.0 must be in [0, inf)"),
    ("unet_rgb", "train", "optimizer.learning_rate", float("inf"),
     "config.optimizer.learning_rate=inf must be a finite number"),
    ("unet_rgb", "train", "data.synthetic.cube_scale", 0.0,
     "config.data.synthetic.cube_scale=0.0 must be in (0, inf)"),
    ("unet_rgb", "train", "data.synthetic.shadow_lights", 4,
     "config.data.synthetic.shadow_lights=4 must be in [1, 3]"),
    ("unet_rgb", "train", "data.synthetic.contact_occlusion", 1.5,
     "config.data.synthetic.contact_occlusion=1.5 must be in [0, 1]"),
    ("unet_objects", "train", "objectives.self_training_rounds", -1,
     "config.objectives.self_training_rounds=-1 must be 0 or more"),
    ("unet_objects", "train", "objectives.pseudo_masks.round", -1,
     "config.objectives.pseudo_masks.round=-1 must be 0 or more"),
    ("slot_attention", "train", "model.slot_attention.num_iterations", 0,
     "config.model.slot_attention.num_iterations=0 must be in [1, inf)"),
    ("slot_attention", "train", "model.slot_attention.num_slots", 0,
     "config.model.slot_attention.num_slots=0 must be in [1, inf)"),
    ("slot_attention", "train", "model.slot_attention.num_slots", 12,
     "num_slots=12 is more than the 11 labels segmenter 'slot_argmax' counts"),
    ("slot_attention", "train", "model.slot_attention.init", "kmean",
     "config.model.slot_attention.init='kmean' is not one of 'gaussian', 'learned', 'kmeans'"),
    ("slot_attention", "evaluate", "model.slot_attention.update_rule", "lstm",
     "config.model.slot_attention.update_rule='lstm' is not one of 'gru', 'mean'"),
    ("slot_attention", "train", "model.slot_attention.kmeans_iterations", 0,
     "config.model.slot_attention.kmeans_iterations=0 must be in [1, inf)"),
    ("slot_attention", "train", "model.slot_attention.decoder_layers", -1,
     "config.model.slot_attention.decoder_layers=-1 must be in [0, inf)"),
    ("slot_attention", "train", "optimizer.grad_clip_norm", -1.0,
     "config.optimizer.grad_clip_norm=-1.0 must be in [0, inf)"),
    ("unet_rgb", "train", "eval.taps", (), "config.eval.taps is empty"),
    ("unet_rgb", "train", "eval.taps", ("input", "enc9"),
     "config.eval.taps (or eval.hypercolumns) names ['enc9'], which this network does not"),
    ("slot_attention", "evaluate", "eval.taps", ("input", "enc1"), "names ['enc1']"),
    ("unet_rgb", "train", "eval.max_regions", 100000,
     "config.eval.max_regions=100000 is more than 1024"),
    ("unet_rgb", "baselines", "eval.segmenter_names", (), "config.eval.segmenter_names is empty"),
    ("unet_rgb", "baselines", "eval.segmenter_names", ("kmeans", "hybird"),
     "config.eval.segmenter_names names 'hybird', which config.eval.segmenters does not"),
    ("unet_rgb", "baselines", "data.eval_file_height", 64,
     "eval_file_height and eval_file_width are given together"),
    ("unet_objects", "train", "objectives.pseudo_masks.round_segmenter", "kmeans",
     "round_segmenter='kmeans' takes K from the labels"),
])
def test_validation_refuses_before_any_work(config_name, mode, path, value, expected):
  config = validate.load_config_file(f"configs/{config_name}.py:test")
  validate.check_config(config, mode)
  _set(config, path, value)
  if path == "objectives.pseudo_masks.round_segmenter":
    _set(config, "objectives.self_training_rounds", 1)
  with pytest.raises(ValueError, match=re.escape(expected)):
    validate.check_config(config, mode)


def test_a_round_whose_teacher_is_its_own_workdir_is_refused(tmp_path):
  config = validate.load_config_file("configs/unet_objects.py:test")
  _set(config, "objectives.pseudo_masks.round", 1)
  _set(config, "objectives.pseudo_masks.teacher_workdir", str(tmp_path / "run"))
  # Another workdir passes this check and meets the next: the teacher has no checkpoint.
  with pytest.raises(ValueError, match="needs the previous round's network"):
    validate.check_config(config, "train", workdir=str(tmp_path / "round1"))
  with pytest.raises(ValueError, match="teacher_workdir=.* is this run's own --workdir"):
    validate.check_config(config, "train", workdir=str(tmp_path / "." / "run"))


def test_a_pseudo_mask_cache_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
  config = validate.load_config_file("configs/unet_objects.py:test")
  (tmp_path / "masks").write_text("")
  _set(config, "objectives.pseudo_masks.cache_dir", str(tmp_path / "masks"))
  with pytest.raises(ValueError, match="cache_dir=.*masks is a file, not a directory"):
    validate.check_config(config, "train", workdir=str(tmp_path / "run"))


# --- results and checkpoints -------------------------------------------------------


def test_report_over_a_results_json_cut_short_names_the_file(_children):
  line = error_line(_children["report_cut_json"].result())
  assert "cut_results/results.json is not valid JSON" in line
  assert "--mode=evaluate" in line


@pytest.mark.parametrize("mode", ["train", "evaluate"])
def test_changed_architecture_is_a_config_mismatch_not_damage(_children, mode):
  result = _children[f"wider_{mode}"].result()
  line = error_line(result)
  assert "holds another network than the config builds" in line
  assert "The config does not match the checkpoint" in line
  # Width 8 -> 16: the bottleneck's first kernel (listed first) doubles both channel counts.
  assert "params/bottleneck/conv1/kernel is (3, 3, 64, 128) there, (3, 3, 128, 256) here" in line
  for advice in ("Delete", "non-restorable", "does not restore", "strict=False"):
    assert advice not in line, advice
  assert len(line) < 700, len(line)
  assert "Exception ignored" not in result.stderr and len(result.stderr.splitlines()) < 30
  # Nothing set aside as damaged.
  workdir = result.args[-1].split("=", 1)[1]
  assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))


def test_full_disk_is_one_short_line_that_says_where_training_resumes(_children):
  result = _children["full_disk"].result()
  stderr = result.stderr
  line = error_line(result)
  assert line.startswith(
      f"error: cannot write a checkpoint in {_children['full_disk_workdir']}/checkpoints "
      "(File too large)"), line
  assert line.endswith("training resumes from step 8."), line
  for noise in ("Exception ignored", "Task exception", "Event loop is closed", "OUT_OF_RANGE",
                "orbax"):
    assert noise not in stderr, noise
  assert len(stderr.splitlines()) < 30, stderr[-5000:]


# --- Ctrl-C ----------------------------------------------------------------------


def test_ctrl_c_says_where_training_resumes_and_every_step_is_logged_once(
    _children, run_python, data_dir):
  result = _children["interrupted"].result()
  workdir = _children["interrupted_workdir"]
  assert "Traceback" not in result.stderr, result.stderr[-5000:]
  assert result.returncode == 130, result.stderr[-5000:]
  assert result.stderr.rstrip().splitlines()[-1] == (
      "interrupted: run the same command again to resume training from step 2 "
      f"(its checkpoint is in {workdir})")
  resumed = run_python([os.path.join(HELPERS, "train_run.py"),
                        "--config=configs/unet_rgb.py:test", f"--config.data.data_dir={data_dir}",
                        f"--workdir={workdir}", "--config.num_epochs=1",
                        "--config.log_every_steps=1", "--config.checkpoint_every_steps=100"])
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in records if "test/loss" in r] == [4]


# --- --mode=segment: the user's own images --------------------------------------------


def _regions(width: int, levels) -> np.ndarray:
  """Vertical bands, one per level: len(levels) regions."""
  return np.repeat(np.asarray(levels), width // len(levels))[None].repeat(16, axis=0)


def _euclidean(config):
  """Gray levels differ in length, not direction: cosine K-Means cannot tell them apart."""
  config.eval.segmenters[config.eval.user_segmenter].metric = "euclidean"
  return config


def test_segment_outputs_are_unique_per_input(tmp_path, test_config):
  from clevr_jax import evaluation  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "in"
  (folder / "a").mkdir(parents=True)
  (folder / "b").mkdir()
  two = np.stack([_regions(48, [0, 255])] * 3, -1).astype(np.uint8)
  three = np.stack([_regions(48, [0, 120, 255])] * 3, -1).astype(np.uint8)
  Image.fromarray(two).save(folder / "scene.png")
  Image.fromarray(three).save(folder / "scene.bmp")  # lossless: the regions stay exact
  Image.fromarray(two).save(folder / "a" / "x.png")
  Image.fromarray(three).save(folder / "b" / "x.png")
  inputs = [str(folder / "scene.png"), str(folder / "scene.bmp"), str(folder / "a" / "x.png"),
            str(folder / "b" / "x.png")]
  out = tmp_path / "out"
  written = evaluation.segment_images(_euclidean(test_config()), str(tmp_path), inputs, tap="input",
                                      num_clusters=3, output_dir=str(out))
  assert len(set(written)) == 4 and all(os.path.exists(w) for w in written)
  regions = {os.path.basename(w): len(np.unique(np.asarray(Image.open(w)))) for w in written}
  # Each input's own result: K=3 finds 2 regions in the two-band images, 3 in the others.
  assert regions == {"scene_png_labels.png": 2, "scene_bmp_labels.png": 3,
                     "a_x_png_labels.png": 2, "b_x_png_labels.png": 3}, regions


def test_sixteen_bit_png_is_read_at_full_range_and_segmented(tmp_path, test_config):
  from clevr_jax import evaluation  # pylint: disable=g-import-not-at-top
  from clevr_jax.evaluation import user_images  # pylint: disable=g-import-not-at-top
  levels = [10000, 30000, 60000]  # all above 255: 8-bit clipping makes them one white
  path = tmp_path / "deep.png"
  Image.fromarray(_regions(48, levels).astype(np.uint16)).save(path)
  assert Image.open(path).mode.startswith("I")  # Pillow reads it as 16-bit
  rgb = user_images.load_rgb(str(path))
  np.testing.assert_array_equal(np.unique(rgb), np.asarray(levels, np.float32) / 65535)
  (written,) = evaluation.segment_images(_euclidean(test_config()), str(tmp_path), [str(path)], tap="input",
                                         num_clusters=3, output_dir=str(tmp_path / "out"))
  assert len(np.unique(np.asarray(Image.open(written)))) == 3
