"""The learning curve of a Slot Attention run: its slot masks scored at every kept checkpoint.

  python -m tools.slot_curve --config=configs/slot_attention.py:experiment \
      --workdir=runs/slot_attention_experiment

Train with every checkpoint kept (e.g. --config.keep_checkpoints=100). For each
checkpoint of the workdir, in step order, the segmenter 'slot_argmax' (argmax
over the slots, no oracle) scores the taps 'slot_masks' and 'attention' on the
test split with every metric of the protocol; `curve.json` and `curve.md` in the
workdir are rewritten after each checkpoint, so a run cut short keeps its rows.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from clevr_jax import metrics
from clevr_jax import models
from clevr_jax import sharding
from clevr_jax.evaluation import model_eval
from clevr_jax.evaluation import protocol
from clevr_jax.segmentation import segmenters as segmenters_lib
from clevr_jax.training import checkpoints
from clevr_jax.training import state as state_lib
from clevr_jax.training import train_step

config_flags.DEFINE_config_file("config", None, "configs/slot_attention.py with ':preset'.")
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_string("segmenter", "slot_argmax", "The segmenter of the slot masks.")
FLAGS = flags.FLAGS
TAPS = ("slot_masks", "attention")


def curve_markdown(rows: list[dict]) -> str:
  columns = list(metrics.INSTANCE_METRICS)
  lines = ["| step | tap | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 2) + "|"]
  for row in rows:
    lines.append(f"| {row['step']} | {row['tap']} | "
                 + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  del argv
  from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  config.eval.taps, config.eval.hypercolumns = TAPS, ()
  segmenter = next(s for s in segmenters_lib.configured(config) if s.name == FLAGS.segmenter)
  mesh = sharding.make_mesh()
  split = pipeline.Split(config, "test")
  model = models.make_model(config)
  with checkpoints.make_manager(FLAGS.workdir, read_only=True) as manager:
    like = state_lib.abstract_state(config, train_step.make_optimizer(config, 1))
    rows = []
    for step in sorted(manager.all_steps()):
      state = checkpoints.restore(manager, like, mesh, step)
      table, _ = protocol.score_features(
          config, mesh, model_eval.tap_features_fn(state, model, config), TAPS, split,
          [segmenter], what=f"step {step}")
      for tap in TAPS:
        rows.append({"step": int(step), "tap": tap} | table[segmenter.name][tap])
      logging.info("step %d: %s", step, table[segmenter.name])
      with open(os.path.join(FLAGS.workdir, "curve.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
      with open(os.path.join(FLAGS.workdir, "curve.md"), "w", encoding="utf-8") as f:
        f.write(curve_markdown(rows))
  print(curve_markdown(rows))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
