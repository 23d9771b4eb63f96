"""tools/segment_errors.py's counts on a hand-made scene whose errors are known."""

import numpy as np

from tools import segment_errors


def _scene():
  """Floor (L 0.5) with four objects: 1 and 2 touch and share a colour, 3 is grey like
  the floor, 4 has a bright highlight; and the prediction that errs on each."""
  truth = np.zeros((30, 40), np.int32)
  truth[5:12, 5:12], truth[5:12, 12:19] = 1, 2
  truth[20:26, 5:11] = 3
  truth[18:28, 25:35] = 4
  lab = np.zeros((30, 40, 3), np.float32)
  lab[..., 0] = 0.5
  lab[(truth == 1) | (truth == 2)] = [0.4, 0.3, 0.0]
  lab[truth == 3] = [0.52, 0.0, 0.0]
  lab[truth == 4] = [0.3, 0.0, 0.4]
  pred = np.zeros_like(truth)
  pred[(truth == 1) | (truth == 2)] = 1  # fused
  # 3 is lost to the floor (label 0).
  pred[truth == 4] = 2
  pred[18:28, 30:35] = 3  # 4 cut in two halves
  pred[20:22, 26:28] = 4  # a highlight: brighter than object 4
  lab[20:22, 26:28, 0] = 0.9
  return pred, truth, lab


def test_each_kind_of_error_is_counted_once():
  pred, truth, lab = _scene()
  counts = segment_errors.count_errors(pred, truth, lab, same_colour=0.1, piece=0.1,
                                       darker=0.03)
  assert counts["objects"] == 4
  assert counts["lost_to_floor"] == 1
  assert counts["fused"] == counts["fused_touching"] == 2
  assert counts["fused_one_colour_touching"] == 2
  assert counts["cut"] == 1
  # Extra: mask 3 (the second half of 4, a piece) and mask 4 (the highlight).
  assert counts["extra"] == 2
  assert counts["extra_highlight"] == 1 and counts["extra_piece"] == 1


def test_perfect_merge_and_oracle_cut():
  pred, truth, _ = _scene()
  merged = segment_errors.perfect_merge(pred, truth)
  # The fused region goes to one object; the lost object stays floor.
  assert len(np.unique(merged[(truth == 1) | (truth == 2)])) == 1
  cut = segment_errors.oracle_cut(pred, truth, share=0.05)
  np.testing.assert_array_equal(segment_errors.perfect_merge(cut, truth)[truth != 3],
                                truth[truth != 3])


def test_on_a_checkpoint_it_scores_a_tap_as_the_evaluation_does(run_python, trained_workdir,
                                                                 test_config, data_dir, tmp_path):
  # The tool's own scores of a learned tap (a coarse one: its labels are upsampled)
  # equal the evaluation's of the same checkpoint, segmenter and tap: it segments
  # what the protocol segments, with the same K-Means keys.
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from clevr_jax.evaluation import model_eval  # pylint: disable=g-import-not-at-top
  out = tmp_path / "errors.json"
  result = run_python(["-m", "tools.segment_errors", "--config=configs/unet_rgb.py:test",
                       f"--config.data.data_dir={data_dir}", f"--checkpoint={trained_workdir}",
                       "--tap=dec3", "--segmenters=split_merge_predict_k", f"--json={out}"])
  assert result.returncode == 0, result.stderr[-2000:]
  tool = json.loads(out.read_text())["split_merge_predict_k"]["scores"]
  config = test_config("unet_rgb")
  config.eval.taps, config.eval.segmenter_names = ("dec3",), ("split_merge_predict_k",)
  workdir = tmp_path / "evaluated"
  workdir.mkdir()
  os.symlink(os.path.join(trained_workdir, "checkpoints"), workdir / "checkpoints")
  protocol = model_eval.evaluate(config, str(workdir))["segmenters"]["split_merge_predict_k"]
  protocol = protocol["dec3"]
  np.testing.assert_allclose(
      tool, [protocol["fg_ari"], protocol["poster_miou"], protocol["clevrtex_miou"]],
      atol=1e-6)


def test_bad_command_lines_are_one_line_that_names_the_flag(tmp_path):
  from clevr_jax import defaults  # pylint: disable=g-import-not-at-top
  config = defaults.get_config("test")
  assert segment_errors.input_error(config, ["split_merge_predict_k"], "", "embedding") is None
  assert "--segmenters names ['nope']" in segment_errors.input_error(
      config, ["nope"], "", "embedding")
  config.eval.segmenters.split_merge_predict_k.refine_steps = -1
  assert "refine_steps=-1" in segment_errors.input_error(
      config, ["split_merge_predict_k"], "", "embedding")
  config = defaults.get_config("test")
  assert "holds no checkpoints/ folder" in segment_errors.input_error(
      config, ["split_merge_predict_k"], str(tmp_path), "dec3")
  (tmp_path / "checkpoints").mkdir()
  assert "--tap=embedding is not a tap" in segment_errors.input_error(
      config, ["split_merge_predict_k"], str(tmp_path), "embedding")
  assert segment_errors.input_error(config, ["split_merge_predict_k"], str(tmp_path),
                                    "dec3") is None
