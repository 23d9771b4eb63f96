"""A segmenter's schema: the frozen dataclass `Segmenter`, its fields' defaults,
documentation and valid values, in one place.

`clevr_jax.defaults.segmenter` builds the config entry
(`config.eval.segmenters.NAME`) from it, `from_config` reads that entry back,
and `Segmenter.check` is the validation the entry point runs once
(`clevr_jax/validate.py`). Each field's metadata also says which compiled
programs its value shapes (`Segmenter.program`): programs are keyed by what
shapes them, so two segmenters share a program exactly when they agree there.

Pure Python: configs import it before JAX is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from clevr_jax import schema

# The feature transforms a segmenter may name (`transforms.apply` runs them).
TRANSFORMS = ("l2", "standardize", "pca", "lab", "xy")
# Tap names whose features are the image itself.
PIXEL_TAPS = ("input", "pixels")
# The compiled programs of a segmenter (`segmenters.DevicePrograms`): its
# transform, K-Means, post-processing and scoring, or all of it in one.
STAGES = ("transform", "kmeans", "postprocess", "whole")

_TRANSFORM = ("transform", "whole")
_POSTPROCESS = ("postprocess", "whole")


def in_interval(value: float, interval: str) -> bool:
  """Whether `value` lies in `interval`, written '[0, 1)', '(0, inf)': '[' and ']'
  include the end."""
  low, high = (float(v) for v in interval[1:-1].split(","))
  above = value >= low if interval[0] == "[" else value > low
  below = value <= high if interval[-1] == "]" else value < high
  return above and below


def _field(default: Any, doc: str, *, shapes: tuple[str, ...] = (),
           choices: tuple[Any, ...] = (), interval: str = "") -> Any:
  """A field with its doc, the programs it shapes, and its valid values
  (`choices`, or a number in `interval`)."""
  return dataclasses.field(default=default, metadata=dict(
      doc=doc, shapes=shapes, choices=choices, interval=interval))


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """One configured segmenter: features -> transform -> cluster -> post-process -> labels."""
  name: str = _field("", "its key in config.eval.segmenters")
  cluster: str = _field(
      "kmeans", "'kmeans', or 'argmax': each pixel's largest channel is its label (a tap of "
      "per-slot masks, e.g. Slot Attention's 'slot_masks'; no transform, no K; labels >= "
      "k_max count as none)", shapes=("whole",), choices=("kmeans", "argmax"))
  taps: tuple[str, ...] = _field((), "the taps it scores; () = every tap and the raw pixels")
  pixel_transforms: tuple[str, ...] = _field(
      (), "transforms of raw pixels (the 'input' tap and the baselines), comma-separated "
      f"names of {TRANSFORMS}, e.g. 'lab' or 'lab,xy'; '' = the pixels as they are",
      shapes=_TRANSFORM)
  tap_transforms: tuple[str, ...] = _field(
      (), "transforms of learned taps and hypercolumns, e.g. 'standardize', 'l2'",
      shapes=_TRANSFORM)
  pca_dim: int = _field(8, "channels the 'pca' transform keeps", shapes=_TRANSFORM, interval="[1, inf)")
  xy_weight: float = _field(0.0, "weight of the coordinates the 'xy' transform appends",
                            shapes=_TRANSFORM, interval="[0, inf)")
  metric: str = _field("cosine", "K-Means' and the merge's distance: 'cosine' (the poster) "
                       "or 'euclidean'", shapes=_POSTPROCESS, choices=("cosine", "euclidean"))
  k: str = _field(
      "oracle", "the regions wanted: 'oracle' (the image's number of true masks, background "
      "included), 'fixed' (fixed_k) or 'predict' (no K: merging under a threshold decides)",
      choices=("oracle", "fixed", "predict"))
  fixed_k: int = _field(11, "K when k='fixed'", interval="[1, inf)")
  num_clusters: int = _field(
      0, "K-Means clusters; 0 = the K above. More than K over-clusters (K0) and the "
      "post-processing merges back", interval="[0, inf)")
  modal_size: int = _field(0, "majority filter window before splitting (0 or 1: none)",
                           shapes=_POSTPROCESS, interval="[0, inf)")
  split: bool = _field(False, "split every cluster into its 4-connected components",
                       shapes=_POSTPROCESS)
  shape_split: bool = _field(
      False, "cut a region of thick parts joined by a narrow waist (two touching objects "
      "of one colour) between the peaks of its distance transform, before the merge; "
      "the parts do not merge back under a threshold. Needs split=True",
      shapes=_POSTPROCESS)
  shape_split_min_radius: float = _field(
      0.03, "shape_split: a part's peak (its largest inscribed radius) is at least this "
      "fraction of the image's height", shapes=_POSTPROCESS, interval="[0, 0.5]")
  shape_split_waist: float = _field(
      0.7, "shape_split: a cut is kept where the waist (the cut's distance to the edge) is "
      "at most this fraction of both parts' peaks", shapes=_POSTPROCESS, interval="(0, 1)")
  shape_split_max_area: float = _field(
      0.15, "shape_split: regions over this fraction of the image's area (the floor) are "
      "not cut", shapes=_POSTPROCESS, interval="(0, 1]")
  min_area: float = _field(
      0.0, "regions under this fraction of the image's area (5e-4: 38 pixels at 240x320) "
      "are absorbed into the nearest kept region", shapes=_POSTPROCESS, interval="[0, 1)")
  refine_steps: int = _field(
      0, "rounds in which each pixel takes, of its own region and its 4-neighbours', the "
      "one whose mean feature is nearest its own, after the specks are absorbed and "
      "before the merge: boundaries the majority filter moved go back; 0 = none",
      shapes=_POSTPROCESS, interval="[0, 50]")
  merge: bool = _field(
      False, "merge adjacent regions by mean-feature distance: down to K ('oracle', "
      "'fixed'), or while closer than the threshold ('predict')", shapes=_POSTPROCESS)
  border_merge_factor: float = _field(
      1.0, "the merge's distance between a region that touches the image's border (the "
      "floor's pieces) and one that does not (an object) is multiplied by this: above 1, "
      "objects of nearly the floor's colour (grey ones) stay apart; 1 = no change",
      shapes=("whole",), interval="[1, inf)")
  merge_threshold: float = _field(
      0.0, "the distance under which 'predict' merges (raw pixels, and taps unless "
      "tap_merge_threshold is set)", shapes=("whole",), interval="[0, inf)")
  tap_merge_threshold: float = _field(
      0.0, "the same for learned taps (> 0): distances in a learned space have their own "
      "scale (e.g. the margins of the loss that shaped it); 0 = merge_threshold",
      shapes=("whole",), interval="[0, inf)")
  colour_merge_threshold: float = _field(
      0.0, "merge_source='tap_or_pixels' on a learned tap: the Lab distance under which "
      "colour alone merges; 0 = merge_threshold", shapes=("whole",), interval="[0, inf)")
  split_source: str = _field(
      "tap", "what draws the regions: 'tap' (the scored features' own clusters) or "
      "'pixels' (clusters of the image under pixel_transforms: sharp boundaries, one "
      "region per colour blob)", shapes=("whole",), choices=("tap", "pixels"))
  merge_source: str = _field(
      "tap", "whose region means the merge compares: 'tap', 'pixels', or 'tap_or_pixels' "
      "(two regions merge when either says so: the tap under tap_merge_threshold, or "
      "their colours under colour_merge_threshold). With split_source='pixels' and a "
      "merge by the tap this is the hybrid: the pixels draw the boundaries, the learned "
      "tap (upsampled to the image) decides what belongs together",
      shapes=("whole",), choices=("tap", "pixels", "tap_or_pixels"))

  def scores(self, tap: str) -> bool:
    """Whether it scores `tap` (its `taps`, or every tap)."""
    return not self.taps or tap in self.taps

  @property
  def post_processes(self) -> bool:
    return (self.split or self.merge or self.min_area > 0 or self.modal_size > 1
            or self.shape_split or self.refine_steps > 0)

  @property
  def predicts_k(self) -> bool:
    return self.k == "predict"

  @property
  def uses_pixels(self) -> bool:
    """Whether it reads the image besides the tap (the hybrid's pixel split or merge)."""
    return self.split_source != "tap" or self.merge_source != "tap"

  def transforms_for(self, tap: str) -> tuple[str, ...]:
    return self.pixel_transforms if tap in PIXEL_TAPS else self.tap_transforms

  def threshold_for(self, tap: str) -> float:
    """The 'predict' threshold: it belongs to the space the merge compares in."""
    if (tap in PIXEL_TAPS or self.merge_source == "pixels"
        or self.tap_merge_threshold <= 0):
      return self.merge_threshold
    return self.tap_merge_threshold

  @property
  def colour_threshold(self) -> float:
    """The colour distance under which 'tap_or_pixels' merges on a learned tap."""
    return self.colour_merge_threshold or self.merge_threshold

  @property
  def colour_scale(self) -> float:
    """'tap_or_pixels': the factor that puts Lab distances in the tap's units, where
    a colour distance under its threshold is one under the tap's; else 0."""
    if self.merge_source != "tap_or_pixels" or self.colour_threshold <= 0:
      return 0.0
    return self.tap_merge_threshold / self.colour_threshold

  @property
  def k_max(self) -> int:
    """K-Means' static cluster bound: the label slots every program sizes."""
    return max(schema.MAX_SLOTS, self.fixed_k, self.num_clusters)

  def program(self, stage: str) -> Segmenter:
    """The segmenter as the `stage` program (one of `STAGES`) sees it: the fields
    that do not shape that program at their defaults, K-Means' bound `k_max`
    kept. The program is built from this value and keyed by it, so it reads
    nothing its key lacks, and segmenters equal here share one compile."""
    kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if stage in f.metadata["shapes"]}
    return Segmenter(**kept, fixed_k=self.k_max)

  def check(self) -> None:
    """ValueError, one line naming the field and what to set, unless every field
    holds a valid value and the fields agree with each other."""
    where = f"eval.segmenters.{self.name}"
    for f in dataclasses.fields(self):
      value, meta = getattr(self, f.name), f.metadata
      if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{where}.{f.name}={value!r}: choose one of {list(meta['choices'])}")
      if not meta["interval"]:
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.{where}.{f.name}={value!r} must be a number in "
                         f"{meta['interval']}: set --config.{where}.{f.name}")
      if not math.isfinite(value):
        raise ValueError(f"config.{where}.{f.name}={value} must be a finite number")
      if not in_interval(value, meta["interval"]):
        raise ValueError(f"config.{where}.{f.name}={value} must be in {meta['interval']}: "
                         f"set --config.{where}.{f.name}")
    if self.uses_pixels and not (self.cluster == "kmeans" and self.split):
      raise ValueError(f"{where}: a split or merge by the image (split_source="
                       f"{self.split_source!r}, merge_source={self.merge_source!r}) "
                       "needs cluster='kmeans' and split=True (regions drawn by its clusters)")
    if self.shape_split and not self.split:
      raise ValueError(f"{where}: shape_split cuts the 4-connected regions of the "
                       f"clusters: set --config.{where}.split=True too")
    if self.merge_source == "tap_or_pixels" and not (
        self.colour_threshold > 0 and self.tap_merge_threshold > 0):
      raise ValueError(f"{where}: merge_source='tap_or_pixels' compares colours under "
                       "colour_merge_threshold (or merge_threshold) and the tap under "
                       f"tap_merge_threshold (now {self.colour_threshold} and "
                       f"{self.tap_merge_threshold}): set both above 0")
    if self.predicts_k and not (self.merge and self.num_clusters > 0):
      raise ValueError(f"{where}: k='predict' needs merge=True and num_clusters > 0 (the "
                       "clusters to merge from)")


_TUPLE_FIELDS = ("taps", "pixel_transforms", "tap_transforms")
FIELDS = tuple(f.name for f in dataclasses.fields(Segmenter) if f.name != "name")


def parse_transforms(spec: str) -> tuple[str, ...]:
  """'lab,xy' -> ('lab', 'xy'); ValueError naming an unknown transform."""
  names = tuple(s.strip() for s in spec.split(",") if s.strip())
  unknown = [n for n in names if n not in TRANSFORMS]
  if unknown:
    raise ValueError(f"unknown feature transform(s) {unknown}: choose from {list(TRANSFORMS)}")
  return names


def to_config(**overrides: Any) -> ml_collections.ConfigDict:
  """A segmenter's config entry: every field present, so that any can be set from
  the command line (--config.eval.segmenters.NAME.FIELD=...); the defaults are
  the dataclass's, transforms written as 'lab,xy'."""
  unknown = set(overrides) - set(FIELDS)
  if unknown:
    raise ValueError(f"unknown segmenter field(s) {sorted(unknown)}; the fields are "
                     f"{list(FIELDS)}")
  values = {f.name: f.default for f in dataclasses.fields(Segmenter) if f.name != "name"}
  values |= overrides
  for key in ("pixel_transforms", "tap_transforms"):
    if not isinstance(values[key], str):
      values[key] = ",".join(values[key])
  return ml_collections.ConfigDict(values)


def from_config(name: str, entry: ml_collections.ConfigDict) -> Segmenter:
  """The Segmenter of a config entry (`to_config`'s form); ValueError names an
  unknown field or transform. `Segmenter.check` says whether its values are valid."""
  values = dict(entry)
  unknown = set(values) - set(FIELDS)
  if unknown:
    raise ValueError(f"eval.segmenters.{name}: unknown field(s) {sorted(unknown)}; "
                     f"the fields are {sorted(FIELDS)}")
  for key in ("pixel_transforms", "tap_transforms"):
    if key in values and isinstance(values[key], str):
      values[key] = parse_transforms(values[key])
  for key in _TUPLE_FIELDS:
    if key in values:
      values[key] = tuple(values[key])
  return Segmenter(name=name, **values)


def field_docs() -> dict[str, str]:
  """Each field's documentation, by name (for the reference pages and --help)."""
  return {f.name: f.metadata["doc"] for f in dataclasses.fields(Segmenter)}
