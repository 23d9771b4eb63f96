"""Writes the two real `clevr_with_masks` records of tests/data as an
official-format GZIP TFRecord, to score any run on them through the eval-file
path (resized to the run's image size):

  python -m tools.real_samples --out=/tmp/samples.tfrecords
  python -m clevr_jax.main --config=configs/unet_objects.py:experiment --mode=evaluate \
      --workdir=RUN --config.data.eval_file=/tmp/samples.tfrecords --config.eval.batch_size=1
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from clevr_jax import schema
from clevr_jax.data import official

SAMPLES_DIR = os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                           "clevr_with_masks_samples")


def sample_examples(folder: str = SAMPLES_DIR, indices: Sequence[int] = (0, 1),
                    crop: tuple[int, int] | None = None) -> list[dict[str, np.ndarray]]:
  """The samples as official-schema examples (no attributes: zero codes and
  floats), optionally cropped to their top-left `crop` = (height, width)."""
  examples = []
  for index in indices:
    with np.load(os.path.join(folder, f"sample_{index}.npz")) as data:
      image, mask = data["image"], data["mask"]
    if crop is not None:
      h, w = crop
      image, mask = image[:h, :w], mask[:, :h, :w]
    example = {"image": image, "mask": mask,
               "pixel_coords": np.zeros((schema.MAX_SLOTS, 3), np.float32)}
    for name in schema.FLOAT_FEATURES:
      example[name] = np.zeros(schema.MAX_SLOTS, np.float32)
    example["visibility"] = (mask.reshape(schema.MAX_SLOTS, -1).max(1) > 0).astype(np.float32)
    for name in schema.CODE_FEATURES:
      example[name] = np.zeros(schema.MAX_SLOTS, np.uint8)
    examples.append(example)
  return examples


def main(argv) -> None:
  del argv
  official.write_records(flags.FLAGS.out, sample_examples())
  print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
  # Defined here, not at import: the tests import `sample_examples`.
  flags.DEFINE_string("out", None, "The .tfrecords file to write.")
  flags.mark_flags_as_required(["out"])
  app.run(main)
