"""Data: the synthetic renderer, TFDS builders and the tf.data pipeline."""

from __future__ import annotations

import importlib.util
import os


def set_tensorflow_environment() -> None:
  """Settings TensorFlow reads when it is imported (a user's own setting wins).

  Call before the first `import tensorflow`: the entry point does (console.set_environment),
  and so does tests/conftest.py. Importing the pipeline sets nothing.
  """
  os.environ.setdefault("NO_GCE_CHECK", "true")  # no metadata-server probes offline
  # `import tensorflow` imports Keras to register its optimizers (2.6 s of a
  # 9 s import on the development host, scikit-learn included) and skips it
  # when told to use the legacy tf_keras and that is not installed. The
  # pipeline uses no Keras; `tf.keras` is then unavailable in the process.
  if importlib.util.find_spec("tf_keras") is None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
