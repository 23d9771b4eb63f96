"""Evaluation end to end: files and tables of a trained run, baselines on the real
samples, the user-image mode, and K-Means against scikit-learn on tap features."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from clevr_jax import evaluate
from clevr_jax import kmeans
from clevr_jax import metrics
from clevr_jax import models
from clevr_jax import state as state_lib
from clevr_jax.data import official
from clevr_jax import schema

# Two real records, kept in the repository (see their README for licence and source).
SAMPLES = os.path.join(os.path.dirname(__file__), "data", "clevr_with_masks_samples")


@pytest.fixture(scope="module")
def evaluated(trained_workdir, test_config):
  config = test_config("unet_rgb")
  results = evaluate.evaluate(config, trained_workdir)
  return config, trained_workdir, results


def test_evaluation_writes_every_file_with_every_tap(evaluated):
  config, workdir, results = evaluated
  for name in ("results.json", "results.md", "miou_per_tap.png", "masks.png",
               "iou_matrix.png", "tap_pca.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["checkpoint_step"] == results["checkpoint_step"] > 0
  assert saved["num_images"] == 12  # the whole test split, padding excluded
  assert list(saved["taps"]) == list(models.TAP_NAMES)
  for tap, by_mode in saved["taps"].items():
    for mode in evaluate.K_MODES:
      row = by_mode[mode]
      assert set(row) == set(metrics.INSTANCE_METRICS), (tap, mode)
      assert 0.0 <= row["poster_miou"] <= 1.0
      assert -1.0 <= row["ari"] <= 1.0
      # ClevrTex divides by max(#true, #predicted) >= #true: never above the poster's score.
      assert row["clevrtex_miou"] <= row["poster_miou"] + 1e-9
      # The best overlap of each true mask bounds its matched IoU.
      assert row["mbo"] >= row["poster_miou"] - 1e-9
  markdown = open(os.path.join(workdir, "results.md")).read()
  for tap in models.TAP_NAMES:
    assert f"| {tap} |" in markdown


def test_oracle_k_uses_the_number_of_true_masks(evaluated):
  # With K = number of true masks, clusters can never outnumber the true masks,
  # so the ClevrTex denominator equals the poster's and the two scores agree.
  _, _, results = evaluated
  for tap, by_mode in results["taps"].items():
    oracle = by_mode["oracle_k"]
    assert oracle["clevrtex_miou"] == pytest.approx(oracle["poster_miou"], abs=1e-6), tap


def _write_sample(path, index):
  data = np.load(os.path.join(SAMPLES, f"sample_{index}.npz"))
  example = {"image": data["image"], "mask": data["mask"],
             "pixel_coords": np.zeros((schema.MAX_SLOTS, 3), np.float32)}
  for name in schema.FLOAT_FEATURES:
    example[name] = np.zeros(schema.MAX_SLOTS, np.float32)
  example["visibility"] = (data["mask"].reshape(schema.MAX_SLOTS, -1).max(1) > 0
                           ).astype(np.float32)
  for name in schema.CODE_FEATURES:
    example[name] = np.zeros(schema.MAX_SLOTS, np.uint8)
  official.write_records(path, [example])


@pytest.mark.parametrize("index", [0, 1])
def test_raw_pixel_kmeans_beats_random_masks_on_each_real_sample(index, tmp_path, test_config):
  path = str(tmp_path / f"sample_{index}.tfrecords")
  _write_sample(path, index)
  config = test_config("unet_rgb")
  with config.unlocked():
    config.data.image_height, config.data.image_width = 240, 320
    config.data.eval_file = path
    config.eval.batch_size = 1
    config.eval.kmeans.num_restarts = 2
    config.eval.kmeans.max_iter = 50
  results = evaluate.baselines(config, str(tmp_path / "baselines"))
  table = results["taps"]
  random = table["random_masks"]["oracle_k"]["poster_miou"]
  assert results["num_images"] == 1
  for name in ("kmeans_pixels_euclidean", "kmeans_pixels_cosine"):
    assert table[name]["oracle_k"]["poster_miou"] > random + 0.1, name
    assert table[name]["oracle_k"]["fg_ari"] > table["random_masks"]["oracle_k"]["fg_ari"]
  assert os.path.exists(tmp_path / "baselines" / "baselines.md")


def test_user_images_of_odd_sizes_and_rgba_come_out_at_their_size(
    tmp_path, trained_workdir, test_config):
  rng = np.random.default_rng(0)
  rgba = Image.open(os.path.join(SAMPLES, "..", "clevr_renders", "img1.png"))
  assert rgba.mode == "RGBA"
  rgba.crop((0, 0, 101, 77)).save(tmp_path / "rgba.png")
  Image.fromarray((rng.random((37, 51)) * 255).astype(np.uint8)).save(tmp_path / "gray.png")
  config = test_config("unet_rgb")
  # Euclidean: under cosine distance every gray RGB pixel points the same way,
  # so a gray image is rightly one cluster at the input tap.
  config.eval.kmeans.metric = "euclidean"
  for tap, k in (("input", 4), ("enc2", 3)):
    written = evaluate.segment_images(config, trained_workdir, [str(tmp_path)], tap=tap,
                                      num_clusters=k, output_dir=str(tmp_path / tap))
    shapes = {os.path.basename(p): np.asarray(Image.open(p)).shape for p in written}
    assert shapes == {"gray_labels.png": (37, 51), "rgba_labels.png": (77, 101)}
    for p in written:
      labels = np.asarray(Image.open(p))
      assert labels.max() < k and len(np.unique(labels)) > 1
  with pytest.raises(ValueError, match="--tap"):
    evaluate.segment_images(config, trained_workdir, [str(tmp_path)], tap="enc9",
                            num_clusters=3, output_dir=str(tmp_path / "x"))
  with pytest.raises(FileNotFoundError, match="no file or folder"):
    evaluate.segment_images(config, trained_workdir, [str(tmp_path / "missing")],
                            tap="input", num_clusters=3, output_dir=str(tmp_path / "x"))


def test_kmeans_matches_sklearn_on_tap_features_of_a_trained_model(trained_workdir, test_config):
  sklearn_cluster = pytest.importorskip("sklearn.cluster")
  config = test_config("unet_rgb")
  mesh = state_lib.make_mesh()
  state, model = evaluate.restore_state(config, trained_workdir, mesh)
  images = np.asarray(Image.open(os.path.join(SAMPLES, "..", "clevr_renders", "img3.png"))
                      .convert("RGB").resize((64, 48)), np.float32)[None] / 255
  for tap in ("enc1", "enc3", "dec4"):
    feats = np.asarray(state_lib.make_predict_fn(model, (tap,))(state, images)[1][tap])
    points = feats.reshape(1, -1, feats.shape[-1])
    k = 6
    ours = kmeans.kmeans(points, np.array([k]), jax.random.key(0), k_max=k,
                         num_restarts=10, metric="euclidean")
    reference = sklearn_cluster.KMeans(n_clusters=k, n_init=10, random_state=0).fit(
        points[0].astype(np.float64))
    ours_inertia = float(((points[0] - np.asarray(ours.centroids)[0][np.asarray(ours.labels)[0]])
                          ** 2).sum())
    assert ours_inertia <= reference.inertia_ * 1.01, tap
