"""Self-training rounds: round n's pseudo-masks come from the hybrid
on round n-1's network's tap, each round cached under its own file and key."""

import os

import numpy as np
import pytest

from clevr_jax import defaults
from clevr_jax import validate
from clevr_jax.objects import pseudo_masks
from clevr_jax.objects import self_training


def _object_and_shadow():
  """A red square on grey with a dark shadow below it, and a teacher tap at half
  resolution that gives the shadow the object's code."""
  image = np.full((16, 16, 3), 0.5, np.float32)
  image[4:10, 4:10] = (0.8, 0.1, 0.1)
  image[10:12, 4:10] = (0.2, 0.2, 0.2)
  tap = np.zeros((8, 8, 4), np.float32)
  tap[...] = np.eye(4)[0]
  tap[2:6, 2:5] = np.eye(4)[1]
  return image, tap


def _config(round_=0, teacher=""):
  config = defaults.get_config("test")
  config.data.image_height, config.data.image_width = 16, 16
  config.objectives.discriminative.weight = 1.0
  config.objectives.pseudo_masks.round = round_
  config.objectives.pseudo_masks.teacher_workdir = teacher
  for name in ("split_merge_predict_k", "hybrid_predict_k"):
    config.eval.segmenters[name].num_clusters = 4  # the maps hold 2 colours
    config.eval.segmenters[name].modal_size = 0  # it would round 16x16 corners
  return config


def test_round_one_masks_come_from_the_hybrid_on_the_teachers_tap():
  image, tap = _object_and_shadow()
  round0 = pseudo_masks.make_segmenter(_config())(image[None], np.array([0]))[0]
  assert len(np.unique(round0)) == 3  # by colour, the shadow is a region of its own
  seen = []

  def teacher(images):
    seen.append(images.shape)
    return np.broadcast_to(tap, (len(images),) + tap.shape)

  round1 = pseudo_masks.make_segmenter(_config(1, "t"), teacher)(image[None], np.array([0]))[0]
  assert seen == [(1, 16, 16, 3)]
  assert len(np.unique(round1)) == 2  # the teacher's code joins it to the object
  assert round1[11, 6] == round1[6, 6] != round1[0, 0]
  with pytest.raises(ValueError, match="teacher"):
    pseudo_masks.make_segmenter(_config(1, "t"))


def test_rounds_are_cached_under_their_own_file_and_key(tmp_path):
  workdir = str(tmp_path)
  paths = {r: pseudo_masks.cache_path(_config(r), workdir) for r in (0, 1, 2)}
  assert len(set(paths.values())) == 3
  assert paths[0].endswith("train.npz") and paths[2].endswith("train_round2.npz")
  keys = {r: pseudo_masks.fingerprint(_config(r, "a"), f"a@{r}") for r in (1, 2)}
  assert keys[1] != keys[2]
  # Another teacher (or another checkpoint of it) is another key.
  assert pseudo_masks.fingerprint(_config(1), "a@5") != pseudo_masks.fingerprint(
      _config(1), "a@6")

  calls = []

  def segmenter(value):
    def segment(images, index):
      calls.append(value)
      return np.full(images.shape[:3], value, np.int32)
    return segment

  image, _ = _object_and_shadow()
  batches = lambda: [{"image": image[None], "valid": np.array([True]), "index": np.array([3])}]
  first = pseudo_masks.load_or_compute(paths[1], batches, segmenter(1), keys[1])
  again = pseudo_masks.load_or_compute(paths[1], batches, segmenter(9), keys[1])
  assert calls == [1] and np.all(again.labels == 1) and np.all(first.labels == 1)
  # Round 2 is not served round 1's masks: not from its own file, nor from
  # round 1's file under round 2's key.
  second = pseudo_masks.load_or_compute(paths[2], batches, segmenter(2), keys[2])
  assert calls == [1, 2] and np.all(second.labels == 2)
  pseudo_masks.load_or_compute(paths[1], batches, segmenter(7), keys[2])
  assert calls == [1, 2, 7]
  assert os.path.exists(paths[2])


def test_a_run_chains_rounds_each_taught_by_the_last(tmp_path):
  config = _config()
  config.objectives.self_training_rounds = 2
  chain = self_training.rounds(config, str(tmp_path))
  assert [c.objectives.pseudo_masks.round for c, _ in chain] == [1, 2]
  assert [w for _, w in chain] == [str(tmp_path / "round1"), str(tmp_path / "round2")]
  assert [c.objectives.pseudo_masks.teacher_workdir for c, _ in chain] == [
      str(tmp_path), str(tmp_path / "round1")]
  assert all(c.objectives.self_training_rounds == 0 for c, _ in chain)
  assert config.objectives.pseudo_masks.round == 0  # the run's own config is untouched
  config.objectives.discriminative.weight = 0.0
  with pytest.raises(ValueError, match="no objective uses pseudo-masks"):
    validate.check_self_training(config, None)


def test_a_round_without_a_teacher_checkpoint_is_a_clear_error(tmp_path):
  config = _config(1, str(tmp_path))
  config.objectives.tap = "dec4"  # a tap of this network (it has no embedding head)
  with pytest.raises(ValueError, match="teacher_workdir"):
    validate.check_self_training(config, None)
  assert self_training.teacher_tap(_config()) == (None, "")


def test_a_teacher_of_another_network_is_named_as_the_teacher(trained_workdir, test_config):
  config = test_config("unet_rgb")
  config.model.base_width = 16  # the teacher has 8
  config.objectives.tap = "enc1"
  config.objectives.pseudo_masks.round = 1
  config.objectives.pseudo_masks.teacher_workdir = trained_workdir
  with pytest.raises(ValueError) as error:
    self_training.teacher_tap(config)
  message = str(error.value)
  assert message.startswith("the teacher of round 1, config.objectives.pseudo_masks."
                            f"teacher_workdir={trained_workdir}, holds another network")
  assert "params/bottleneck/conv1/kernel is (3, 3, 64, 128) there, (3, 3, 128, 256) here" \
      in message
  assert "--workdir" not in message  # the run's own workdir is not what is wrong

# Round 1 of a chained run is interrupted after saving step 4 (round 0 finished at 16);
# the training and evaluation are stand-ins, the rest is main's own round loop. In a
# child: importing clevr_jax.main defines absl flags another test module defines too.
_INTERRUPTED_ROUND = """
import os, sys
from clevr_jax import console, defaults, evaluation, main
from clevr_jax.training import train
workdir = sys.argv[1]
config = defaults.get_config("test")
config.objectives.discriminative.weight = 1.0
config.objectives.self_training_rounds = 2
os.makedirs(os.path.join(workdir, "checkpoints", "16"))

def train_and_evaluate(round_config, round_workdir):
  if round_config.objectives.pseudo_masks.round == 1:
    os.makedirs(os.path.join(round_workdir, "checkpoints", "4"))
    raise KeyboardInterrupt

train.train_and_evaluate = train_and_evaluate
evaluation.evaluate = lambda *args: None
main.train_rounds(config, workdir)
"""


def test_ctrl_c_in_a_round_names_that_rounds_workdir_and_step(tmp_path, run_python):
  workdir = str(tmp_path / "run")
  result = run_python(["-c", _INTERRUPTED_ROUND, workdir])
  assert result.returncode == 130, result.stderr[-3000:]
  round1 = os.path.join(workdir, "round1")
  assert result.stderr.rstrip().splitlines()[-1] == (
      "interrupted: run the same command again to resume training from step 4 "
      f"(its checkpoint is in {round1})")
  assert not os.path.exists(os.path.join(round1, ".lock"))  # released for the rerun
