"""How the pseudo-mask segmenter of a config over- or under-segments a split:
regions per image against the true masks, and how whole the background stays.

  python -m tools.pseudo_mask_stats \
      --config=configs/unet_objects.py:experiment [--split=test]
"""

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from clevr_jax.data import pipeline
from clevr_jax.objects import pseudo_masks
from clevr_jax.training import batch as batch_lib

config_flags.DEFINE_config_file("config", None, "A configs/*.py file with ':preset'.")
flags.DEFINE_string("split", "test", "Split to measure.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  segment = pseudo_masks.make_segmenter(config)
  predicted, true, background_share, background_pieces = [], [], [], []
  for batch in pipeline.Split(config, FLAGS.split).eval_batches():
    batch = {k: np.asarray(v) for k, v in batch_lib.derive(batch, config).items()}
    labels = segment(batch["image"], batch["index"])
    for pred, truth, k, valid in zip(labels, batch["instance_labels"], batch["num_masks"],
                                     batch["valid"]):
      if not valid:
        continue
      predicted.append(len(np.unique(pred)))
      true.append(int(k))
      counts = np.bincount(pred[truth == 0], minlength=int(pred.max()) + 1)
      background_share.append(counts.max() / max(counts.sum(), 1))
      background_pieces.append(int((counts > 0.05 * counts.sum()).sum()))
  predicted, true = np.array(predicted), np.array(true)
  print(f"{len(true)} images: {predicted.mean():.2f} pseudo-regions per image, "
        f"{true.mean():.2f} true masks, mean |K - K*| {np.abs(predicted - true).mean():.2f}; "
        f"largest region covers {np.mean(background_share):.3f} of the background, "
        f"background pieces over 5%: {np.mean(background_pieces):.2f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
