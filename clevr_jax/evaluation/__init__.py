"""Evaluation: segment by clustering, score as instance masks, write the tables.

  segmenters.py   a segmenter = feature transform -> K-Means -> post-processing
  transforms.py   per-image feature transforms (jax.numpy, on device)
  regions.py      modal filter, connected components, speck absorption, region
                  merging (jax.numpy, on device, batched)
  postprocess_reference.py  the same in SciPy, one image on the host: the
                  tests' oracle, never on the product path
  protocol.py     the sharded loop over the test split: devices segment and
                  count contingency tables, hosts score them
  model_eval.py   a checkpoint's taps through every segmenter (--mode=evaluate)
  pixel_baselines.py  raw pixels through every segmenter, random masks (--mode=baselines)
  supervised.py   the segmentation U-Net's class maps
  user_images.py  masks for the user's own images (--mode=segment)
  external.py     any method's features (--mode=score_features) and predicted
                  masks (--mode=score_masks), read batch by batch from files
  results.py      results.json / results.md: one table per segmenter
"""

from clevr_jax.evaluation.external import score_features
from clevr_jax.evaluation.external import score_masks
from clevr_jax.evaluation.model_eval import evaluate
from clevr_jax.evaluation.pixel_baselines import baselines
from clevr_jax.evaluation.user_images import segment_images

__all__ = ["baselines", "evaluate", "score_features", "score_masks", "segment_images"]
