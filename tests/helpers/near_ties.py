"""K-Means labels of two differently compiled float32 programs, compared by construction.

Two programs that run the same K-Means on the same points (fused, vectorised or
sharded differently) round differently, so a point nearly equidistant from two
centroids may go either way, on one CPU and not on another. What holds on any
CPU: each program gives each point the centroid nearest under its own centroids,
to within its float32 rounding. If the two programs' centroids k differ by at
most delta_k, a point's distance to centroid k differs between them by at most
L * delta_k (L: how fast the distance moves with the centroid). So a point the
two label a and b has, under either program's centroids, a gap between the two
within L * (delta_a + delta_b) plus both programs' rounding: that is the margin
checked here; a real disagreement (another clustering) has gaps far beyond it.
"""

from __future__ import annotations

import numpy as np

# float32's unit roundoff.
UNIT_ROUNDOFF = 2.0**-24


def _scores(x: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
  """[N, K] in float64, higher = nearer: cos, or minus the squared distance."""
  if metric == "cosine":
    return x @ centroids.T
  return -np.sum((x[:, None, :] - centroids[None]) ** 2, axis=-1)


def assert_equal_but_near_ties(points: np.ndarray, labels_a: np.ndarray,
                               centroids_a: np.ndarray, labels_b: np.ndarray,
                               centroids_b: np.ndarray, metric: str, *,
                               centroid_slack: float = 0.0, what: str = "") -> int:
  """Labels [N] of points [N, D] from programs a and b (their centroids [K, D])
  agree except at near-ties; returns how many points differ.

  `centroid_slack`: a further bound on how far a program's own centroids may lie
  from the ones given for it (e.g. when b's are recomputed from its labels).
  """
  x = np.asarray(points, np.float64)
  ca, cb = np.asarray(centroids_a, np.float64), np.asarray(centroids_b, np.float64)
  labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
  if metric == "cosine":  # the programs compare unit vectors
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.finfo(np.float32).tiny)
  else:  # the programs centre the points (translation changes no comparison)
    mean = x.mean(axis=0)
    x, ca, cb = x - mean, ca - mean, cb - mean
  differ = np.flatnonzero(labels_a != labels_b)
  if differ.size == 0:
    return 0
  a, b, xd = labels_a[differ], labels_b[differ], x[differ]
  delta = np.linalg.norm(ca - cb, axis=-1) + centroid_slack  # [K]
  d = x.shape[-1]
  norm_x = np.linalg.norm(xd, axis=-1)
  if metric == "cosine":
    moved = delta[a] + delta[b]  # |x . (c - c')| <= |c - c'| for a unit x
    # A dot product of D terms errs by at most D u |x||c| = D u here; normalising
    # x and c adds a few u more. Two scores compared, in each of two programs.
    rounding = 4 * (d + 4) * UNIT_ROUNDOFF * np.ones_like(norm_x)
  else:
    # | |x - c|^2 - |x - c'|^2 | <= |c - c'| (|x - c| + |x - c'|) <= delta (2 |x - c| + delta)
    far = lambda c, k: np.linalg.norm(xd - c[k], axis=-1)
    moved = (delta[a] * (2 * far(ca, a) + delta[a]) + delta[b] * (2 * far(ca, b) + delta[b]))
    # The score 2 x.c - |c|^2 of D + 1 terms errs by (D + 2) u (|x| + |c|)^2 at most.
    biggest = np.maximum(np.linalg.norm(ca[a], axis=-1), np.linalg.norm(ca[b], axis=-1))
    rounding = 4 * (d + 2) * UNIT_ROUNDOFF * (norm_x + biggest + delta.max()) ** 2
  rows = np.arange(differ.size)
  for name, centroids in (("a", ca), ("b", cb)):
    s = _scores(xd, centroids, metric)
    gap = np.abs(s[rows, a] - s[rows, b])
    too_far = gap > moved + rounding
    assert not too_far.any(), (
        f"{what}: {int(too_far.sum())} of {differ.size} differing points are no near-ties "
        f"under {name}'s centroids (gap {gap[too_far][:5]} > margin "
        f"{(moved + rounding)[too_far][:5]})")
  return int(differ.size)
