"""Segmentation: arrays in, labels out, on the devices.

`kmeans` (the poster's spherical Lloyd, jitted), `transforms` (pixel and tap
features), `regions` (static-shape post-processing: components, specks,
merges) and `segmenters` (the named pipelines that combine them). Imported by
training (pseudo-masks) and evaluation alike; no TensorFlow, no networks.
"""
