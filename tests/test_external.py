"""Any method's features and masks under the protocol (--mode=score_features,
--mode=score_masks): the images as a feature set reproduce the baselines, the
true masks score 1, random labels the random baseline; 4 devices and 2
processes equal 1; bad input stops with one error naming the file, before
anything is written."""

import json
import os
import zipfile

import numpy as np
from PIL import Image
import pytest

from clevr_jax import evaluation
from clevr_jax import metrics
from clevr_jax.data import pipeline
from clevr_jax.evaluation import external
from clevr_jax.training import batch as batch_lib
from tests.helpers.cli_output import error_line

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO_ROOT, "tests", "helpers", "external_worker.py")
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def test_split(test_config):
  config = test_config("unet_rgb")
  arrays = pipeline.Split(config, "test").train_arrays(["image", "labels", "visibility"])
  return config, arrays


def _random_labels(config, arrays):
  """The labels `pixel_baselines.random_masks` draws for K = the oracle's, per image."""
  rng = np.random.default_rng(config.eval.baselines_seed)
  count, batch = len(arrays["image"]), config.eval.batch_size
  num_masks = arrays["visibility"].astype(np.int64).sum(-1)
  out = []
  for start in range(0, count, batch):
    ks = np.zeros(batch, np.int64)
    real = num_masks[start:start + batch]
    ks[:len(real)] = real
    shape = (batch,) + arrays["labels"].shape[1:]
    for k in (ks, np.full(batch, config.eval.segmenters.kmeans_fixed_k.fixed_k)):
      labels = (rng.random(shape) * np.maximum(k, 1)[:, None, None]).astype(np.int32)
      if k is ks:
        out.append(labels[:len(real)])
  return np.concatenate(out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, test_split):
  """Features and masks of the 12 test images, as another framework writes them.

  features/pixels/<i>.npy   the images, float32 in [0, 1] (as the devices make them)
  features/pooled/*.npz     the images averaged over 2x2 blocks, float16, in two
                            shards whose rows are out of order
  masks/truth/<i>.png       the true masks, 8-bit PNG
  masks/truth_x2/<i>.png    the same at twice the size, 16-bit PNG (resized back)
  masks/random/<i>.npy      the random baseline's labels (K = the oracle's)
  """
  config, arrays = test_split
  root = tmp_path_factory.mktemp("external")
  # The image in [0, 1] as the devices derive it: XLA's x / 255 rounds 126 of the
  # 256 byte values one float32 step away from NumPy's (it multiplies by 1/255).
  images = np.asarray(batch_lib.make_derive(config)({"image": arrays["image"]})["image"])
  (root / "features" / "pixels").mkdir(parents=True)
  (root / "features" / "pooled").mkdir()
  for i, image in enumerate(images):
    np.save(root / "features" / "pixels" / f"{i:03d}.npy", image)
  n, h, w, c = images.shape
  pooled = images.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4)).astype(np.float16)
  order = np.random.default_rng(0).permutation(n)
  for shard, rows in enumerate(np.array_split(order, 2)):
    np.savez(root / "features" / "pooled" / f"shard{shard}.npz", features=pooled[rows],
             index=rows)
  for name in ("truth", "truth_x2", "random"):
    (root / "masks" / name).mkdir(parents=True)
  for i, labels in enumerate(arrays["labels"]):
    Image.fromarray(labels.astype(np.uint8), mode="L").save(root / "masks" / "truth" / f"{i}.png")
    big = np.repeat(np.repeat(labels.astype(np.uint16) * 1000, 2, 0), 2, 1)
    Image.fromarray(big).save(root / "masks" / "truth_x2" / f"{i}.png")
  for i, labels in enumerate(_random_labels(config, arrays)):
    np.save(root / "masks" / "random" / f"{i}.npy", labels)
  return root


@pytest.fixture(scope="module")
def scored(exported, test_split, tmp_path_factory):
  """Baselines, features and masks, each scored once in this process (1 device)."""
  config, _ = test_split
  out = tmp_path_factory.mktemp("scored")
  baselines = evaluation.baselines(config, str(out / "baselines"))
  features = evaluation.score_features(config, str(exported / "features"),
                                       str(out / "features"))
  masks = evaluation.score_masks(config, str(exported / "masks"), str(out / "masks"))
  return baselines, features, masks, out


@pytest.mark.slow  # scores the 12 test images through every segmenter
def test_the_images_as_a_feature_set_reproduce_the_baselines_digit_for_digit(scored):
  baselines, features, _, out = scored
  assert features["num_images"] == baselines["num_images"] == 12
  assert list(features["segmenters"]) == list(baselines["segmenters"])
  for name, by_tap in baselines["segmenters"].items():
    # The same float32 image, the same transforms, keys and programs: equal, not close.
    assert features["segmenters"][name]["pixels"] == by_tap["pixels"], name
    assert set(features["segmenters"][name]) == {"pixels", "pooled"}
  for file in ("results.json", "results.md", "miou_per_tap.png", "masks.png", "tap_pca.png"):
    assert (out / "features" / file).exists(), file
  markdown = (out / "features" / "results.md").read_text()
  assert "| pooled |" in markdown and "| pixels |" in markdown


@pytest.mark.slow  # scores the 12 test images through every segmenter
def test_true_masks_score_one_and_random_labels_the_random_baseline(scored):
  baselines, _, masks, out = scored
  for name in ("truth", "truth_x2"):
    assert masks["masks"][name] == {m: 1.0 for m in metrics.INSTANCE_METRICS} | {
        "k_error": 0.0}, name
  random_row = masks["masks"]["random"]
  for metric, value in baselines["random_masks"]["oracle"].items():
    assert random_row[metric] == pytest.approx(value, abs=1e-9), metric
  with open(out / "masks" / "results.json") as f:
    assert json.load(f)["masks"]["truth"]["poster_miou"] == 1.0
  assert "## predicted masks" in (out / "masks" / "results.md").read_text()
  assert (out / "masks" / "masks.png").exists()


def test_features_at_a_grid_that_does_not_divide_the_image_are_resized_nearest():
  x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
  big = np.asarray(external._resize_nearest(x, 4, 7))  # pylint: disable=protected-access
  assert big.shape == (1, 4, 7, 1)
  # Each output pixel takes the input pixel under its centre.
  rows, cols = [0, 0, 1, 1], [0, 0, 1, 1, 1, 2, 2]
  np.testing.assert_array_equal(big[0, :, :, 0], x[0, :, :, 0][np.ix_(rows, cols)])


def _compare(single, other, tolerance=1e-6):
  assert list(other["segmenters"]) == list(single["segmenters"])
  for name, by_set in single["segmenters"].items():
    for set_name, row in by_set.items():
      for metric, value in row.items():
        assert other["segmenters"][name][set_name][metric] == pytest.approx(
            value, abs=tolerance, nan_ok=True), (name, set_name, metric)
  for set_name, row in single["masks"].items():
    for metric, value in row.items():
      assert other["masks"][set_name][metric] == pytest.approx(value, abs=tolerance), (
          set_name, metric)


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_four_devices_and_two_processes_equal_one(scored, exported, data_dir, tmp_path,
                                                  start_python):
  _, features, masks, _ = scored
  args = lambda pid, n, port, out: [WORKER, pid, n, port, data_dir, exported / "features",
                                    exported / "masks", out]
  four = start_python(args(0, 1, 0, tmp_path / "four"), devices=4)
  port = _free_port()
  two = [start_python(args(i, 2, port, tmp_path / f"two{i}"), devices=2) for i in range(2)]
  for child in [four] + two:
    result = child.result(timeout=TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  single = {"segmenters": features["segmenters"], "masks": masks["masks"]}
  for out, devices, processes in (("four", 4, 1), ("two0", 4, 2)):
    with open(tmp_path / f"{out}.json") as f:
      other = json.load(f)
    assert (other["devices"], other["processes"]) == (devices, processes)
    _compare(single, other)
  assert not (tmp_path / "two1.json").exists()  # process 0 writes


# ---------------------------------------------------------------------------
# Bad input: one error naming the file, nothing written.


def _copy_pixels(exported, dest):
  dest.mkdir(parents=True)
  for name in sorted(os.listdir(exported / "features" / "pixels")):
    (dest / name).write_bytes((exported / "features" / "pixels" / name).read_bytes())
  return dest


def _bad_features(kind, exported, root):
  """(the --features path, the path the error must name) of one kind of bad input."""
  folder = root / "pixels"
  if kind == "missing_path":
    return root / "nowhere", root / "nowhere"
  if kind == "empty_folder":
    (root / "sets" / "empty").mkdir(parents=True)
    return root / "sets", root / "sets" / "empty"
  _copy_pixels(exported, folder)
  if kind == "fewer_images":
    os.remove(folder / "005.npy")
    return folder, folder
  if kind == "more_images":
    np.save(folder / "12.npy", np.load(folder / "000.npy"))
    return folder, folder / "12.npy"
  if kind == "missing_index":  # a shard without its image indices
    os.remove(folder / "004.npy")
    np.savez(folder / "rest.npz", features=np.zeros((1, 48, 64, 3), np.float32))
    return folder, folder / "rest.npz"
  if kind == "not_an_index":
    os.rename(folder / "004.npy", folder / "scene4.npy")
    return folder, folder / "scene4.npy"
  if kind == "mismatched_shapes":
    np.save(folder / "003.npy", np.zeros((24, 32, 3), np.float32))
    return folder, folder / "003.npy"
  if kind == "integer_features":
    np.save(folder / "002.npy", np.zeros((48, 64, 3), np.uint8))
    return folder, folder / "002.npy"
  if kind == "nan":
    x = np.load(folder / "011.npy")
    x[5, 5, 1] = np.nan
    np.save(folder / "011.npy", x)
    return folder, folder / "011.npy"
  if kind == "inf":
    x = np.load(folder / "001.npy")
    x[0, 0, 0] = np.inf
    np.save(folder / "001.npy", x)
    return folder, folder / "001.npy"
  if kind == "corrupt_npz":
    os.remove(folder / "007.npy")
    np.savez(folder / "rest.npz", features=np.zeros((1, 48, 64, 3), np.float32),
             index=np.array([7]))
    data = (folder / "rest.npz").read_bytes()
    (folder / "rest.npz").write_bytes(data[:len(data) // 2])
    return folder, folder / "rest.npz"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing_path", "empty_folder", "fewer_images", "more_images",
                                  "missing_index", "not_an_index", "mismatched_shapes", "integer_features",
                                  "nan", "inf", "corrupt_npz"])
def test_bad_features_name_the_file_and_write_nothing(kind, exported, test_split, tmp_path):
  config, _ = test_split
  path, named = _bad_features(kind, exported, tmp_path / "in")
  out = tmp_path / "out"
  with pytest.raises((ValueError, FileNotFoundError)) as raised:
    evaluation.score_features(config, str(path), str(out))
  assert str(named) in str(raised.value), str(raised.value)
  assert "\n" not in str(raised.value)
  assert not out.exists() or not os.listdir(out)


def test_negative_labels_name_the_mask_file_and_write_nothing(exported, test_split, tmp_path):
  config, _ = test_split
  folder = tmp_path / "labels"
  folder.mkdir()
  for name in os.listdir(exported / "masks" / "random"):
    labels = np.load(exported / "masks" / "random" / name)
    if name == "9.npy":
      labels[3, 3] = -1
    np.save(folder / name, labels)
  with pytest.raises(ValueError, match="negative labels") as raised:
    evaluation.score_masks(config, str(folder), str(tmp_path / "out"))
  assert str(folder / "9.npy") in str(raised.value)
  assert not (tmp_path / "out").exists()


def test_a_corrupt_shard_is_one_error_line_from_the_command_line(exported, data_dir, tmp_path,
                                                                 run_python):
  path, named = _bad_features("corrupt_npz", exported, tmp_path / "in")
  result = run_python(["-m", "clevr_jax.main", "--config=configs/unet_rgb.py:test",
                       f"--config.data.data_dir={data_dir}", "--mode=score_features",
                       f"--features={path}", f"--workdir={tmp_path / 'run'}"], devices=1)
  line = error_line(result)
  assert str(named) in line
  assert not os.path.exists(tmp_path / "run" / "score_features" / "results.json")


def test_score_modes_without_their_folder_name_the_flag(run_python, data_dir, tmp_path):
  result = run_python(["-m", "clevr_jax.main", "--config=configs/unet_rgb.py:test",
                       "--mode=score_masks", f"--workdir={tmp_path}"])
  assert "--masks=" in error_line(result)


def test_a_shard_row_is_read_without_the_others(tmp_path):
  x = np.arange(3 * 2 * 2 * 4, dtype=np.float16).reshape(3, 2, 2, 4)
  np.savez(tmp_path / "a.npz", features=x, index=np.array([5, 0, 9]))
  sets = external.read_sets(str(tmp_path / "a.npz"), "features", 0, 10)
  assert sets[0].name == "a" and sets[0].shape == (2, 2, 4)
  for row, index in enumerate((5, 0, 9)):
    np.testing.assert_array_equal(sets[0].read(index), x[row])
  with zipfile.ZipFile(tmp_path / "a.npz") as archive:
    assert archive.getinfo("features.npy").compress_type == zipfile.ZIP_STORED


# ---------------------------------------------------------------------------
# Across frameworks: the PyTorch twin's taps, scored as features, equal
# --mode=evaluate on the same checkpoint.


def test_the_pytorch_twins_taps_score_as_the_checkpoint_evaluates(
    trained_workdir, test_split, tmp_path):
  torch = pytest.importorskip("torch")  # the `torch` extra
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  from clevr_jax import sharding  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import train_step  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  config, arrays = test_split
  taps = ("input", "bottleneck")  # the image, and the coarsest tap (labels upsampled)
  config.eval.taps, config.eval.hypercolumns = taps, ()
  workdir = tmp_path / "run"  # a copy: the shared checkpoint's folder stays as it is
  shutil.copytree(os.path.join(trained_workdir, "checkpoints"), workdir / "checkpoints")
  evaluated = evaluation.evaluate(config, str(workdir))

  state, model = checkpoints.restore_model(config, str(workdir), sharding.make_mesh())
  net = torch_reference.build_unet(3, 3, config.model.base_width, config.model.depth)
  torch_reference.load_flax_variables(net, jax.device_get(state.params),
                                      jax.device_get(state.batch_stats))
  images = np.asarray(batch_lib.make_derive(config)({"image": arrays["image"]})["image"])
  torch_reference.export_taps(net, images, str(tmp_path / "torch"), taps)

  # The twin computes the network's function: its taps agree with the JAX taps to
  # float32 rounding over the convolutions' sums (as test_benchmarks checks).
  _, jax_taps = train_step.make_predict_fn(model, taps)(state, images)
  for tap in taps:
    ours = np.stack([np.load(tmp_path / "torch" / tap / f"{i}.npy") for i in range(len(images))])
    scale = np.abs(np.asarray(jax_taps[tap])).max()
    np.testing.assert_allclose(ours, np.asarray(jax_taps[tap]), atol=1e-5 * scale, err_msg=tap)
  del torch
  scored = evaluation.score_features(config, str(tmp_path / "torch"), str(tmp_path / "out"))
  # Labels follow from the features by comparisons of distances: with features
  # 1e-5 of the scale apart, a comparison flips only where its two sides lie
  # within that of each other. K-Means' nearest centres and the merges down to K
  # compare two data-dependent distances, and measured no flip: they agree as
  # across devices. A K-predicting merge compares a distance with a fixed
  # threshold, where one merge of one image flipped on the bottleneck (poster
  # mIoU 0.0964 vs 0.0960, k_error 1.083 vs 1.25) and the merges after it
  # followed. One image's figures lie in [0, 1], its predicted K in
  # [1, num_clusters]: a flip in one image moves a mean over N images by at most
  # 1/N (k_error by (num_clusters - 1)/N).
  count = evaluated["num_images"]
  assert set(scored["segmenters"]) == set(evaluated["segmenters"])
  specs = evaluated["segmenter_specs"]
  for name, by_tap in evaluated["segmenters"].items():
    predicts = specs[name]["k"] == "predict"
    for tap in taps:
      for metric, value in by_tap[tap].items():
        spread = specs[name]["num_clusters"] - 1 if metric == "k_error" else 1
        tolerance = spread / count if predicts else 1e-6
        assert scored["segmenters"][name][tap][metric] == pytest.approx(
            value, abs=tolerance, nan_ok=True), (name, tap, metric)
