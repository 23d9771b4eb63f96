"""Data: the synthetic renderer, TFDS builders and the tf.data pipeline."""
