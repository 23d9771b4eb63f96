"""The Python API (`from clevr_jax import segment, score`): the README's example
runs, `segment` labels as the protocol's programs do, `score` equals the
protocol's scoring, and the registry lists the configured segmenters."""

import contextlib
import dataclasses
import io
import os
import re

import numpy as np
import pytest

import clevr_jax
from clevr_jax import defaults
from clevr_jax import metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_example() -> str:
  with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  section = readme.split("## Your own method: the Python API", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_example_runs_and_scores_what_it_says():
  code = _readme_example()
  assert len(code.strip().splitlines()) <= 10
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  first, second = out.getvalue().splitlines()
  # The majority filter takes the square's corners; the refinement gives them back.
  assert first == "(2, 48, 64) 1.0"
  assert eval(second) == sorted(defaults.get_config().eval.segmenters)  # pylint: disable=eval-used


def test_the_registry_is_the_configured_segmenters_with_their_fields():
  registry = clevr_jax.segmenters()
  config = defaults.get_config()
  assert sorted(registry) == sorted(config.eval.segmenters)
  kmeans = registry["kmeans"]
  assert isinstance(kmeans, clevr_jax.Segmenter) and kmeans.k == "oracle"
  fields = clevr_jax.segmenter_fields()
  assert set(fields) == {f.name for f in dataclasses.fields(clevr_jax.Segmenter)} - {"name"}
  default, doc = fields["metric"]
  assert default == "cosine" and "euclidean" in doc


def test_true_masks_score_one_under_any_label_values_and_shuffled_labels_less():
  rng = np.random.default_rng(0)
  truth = np.zeros((3, 16, 20), np.int32)
  truth[:, 2:8, 3:9], truth[:, 9:14, 10:18] = 1, 2
  relabelled = np.where(truth == 0, 7, truth * 40)  # other values, same partition
  assert clevr_jax.score(relabelled, truth) == {m: 1.0 for m in clevr_jax.api.METRICS} | {
      "k_error": 0.0}
  noisy = np.where(rng.random(truth.shape) < 0.2, 5, truth)
  scores = clevr_jax.score(noisy, truth)
  assert scores["poster_miou"] < 1.0 and scores["k_error"] == 1.0


def test_score_equals_the_protocols_scoring_of_the_same_tables():
  rng = np.random.default_rng(1)
  truth = rng.integers(0, 4, (4, 12, 12)).astype(np.int32)
  labels = rng.integers(0, 6, (4, 12, 12)).astype(np.int32)
  expected = metrics.summarize([metrics.score_instances(
      truth, labels, np.array([len(np.unique(t)) for t in truth]), num_true_slots=4,
      num_pred_slots=6)])
  got = clevr_jax.score(labels, truth)
  for metric, value in expected.items():
    if metric != "valid":
      assert got[metric] == pytest.approx(value, abs=1e-12), metric


def test_the_accumulator_averages_batches_as_one():
  rng = np.random.default_rng(2)
  truth = rng.integers(0, 3, (6, 10, 10)).astype(np.int32)
  labels = rng.integers(0, 3, (6, 10, 10)).astype(np.int32)
  accumulator = clevr_jax.Accumulator()
  accumulator.add(labels[:2], truth[:2])
  accumulator.add(labels[2:], truth[2:])
  assert accumulator.num_images == 6
  whole = clevr_jax.score(labels, truth)
  for metric, value in accumulator.result().items():
    assert value == pytest.approx(whole[metric], abs=1e-12), metric


def test_segment_with_a_given_k_gives_that_many_regions_per_image():
  rng = np.random.default_rng(3)
  features = rng.random((2, 12, 16, 3)).astype(np.float32)
  labels = clevr_jax.segment(features, segmenter="kmeans", k=[2, 4])
  assert labels.shape == (2, 12, 16)
  assert [len(np.unique(x)) for x in labels] == [2, 4]


@pytest.mark.parametrize("call, message", [
    (lambda: clevr_jax.segment(np.zeros((1, 4, 4, 3), np.float32), segmenter="kmeans"),
     "pass k=K"),
    (lambda: clevr_jax.segment(np.zeros((1, 4, 4, 3), np.int32)), "features are floats"),
    (lambda: clevr_jax.segment(np.full((1, 4, 4, 3), np.nan, np.float32)), "NaN"),
    (lambda: clevr_jax.segment(np.zeros((1, 4, 4, 3), np.float32), segmenter="nope"),
     "choose one of"),
    (lambda: clevr_jax.score(-np.ones((4, 4), np.int32), np.zeros((4, 4), np.int32)),
     "negative labels"),
])
def test_bad_input_is_one_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
