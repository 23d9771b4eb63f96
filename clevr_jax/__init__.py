"""clevr_jax: Segmentation as Clusterization on CLEVR, in JAX.

The Python API (`clevr_jax.api`), loaded on first use so that `import
clevr_jax` stays light (no JAX, no TensorFlow until asked):
  segment(features, image=None, segmenter=..., k=None) -> labels [B, H, W]
  score(labels, true_masks) -> {metric: mean}
  Accumulator         the same means over many batches
  segmenters()        the segmenter registry: {name: Segmenter}
  segmenter_fields()  each field of a segmenter: (default, documentation)
  Segmenter           a segmenter's fields and defaults (a frozen dataclass)
"""

from __future__ import annotations

from typing import Any

_API = ("Accumulator", "Segmenter", "score", "score_batch", "segment", "segmenter_fields",
        "segmenters")
__all__ = list(_API)


def __getattr__(name: str) -> Any:
  if name in _API:
    from clevr_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'clevr_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_API))
