"""TFDS builder of synthetic CLEVR-like scenes, rendered here (the embedded default).

Same stored form and reader output as the real `clevr_with_masks` builder, so
every later stage runs the same on either. The builder config's name encodes
every setting that changes the data (seed, split sizes, image size, object
counts, renderer version): a changed setting never silently reuses old data.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from clevr_jax.data import clevr_with_masks
from clevr_jax.data import renderer

_SPLIT_IDS = {"train": 0, "test": 1}


@dataclasses.dataclass(kw_only=True)
class SyntheticClevrConfig(tfds.core.BuilderConfig):
  seed: int = 0
  num_train: int = 7000
  num_test: int = 1000
  height: int = 240
  width: int = 320
  min_objects: int = 3
  max_objects: int = 10
  distinct_colors: bool = False
  metal: bool = True
  cube_scale: float = 1.0
  shadow_lights: int = 1
  sun_share: float = 0.0
  contact_occlusion: float = 0.0
  contact_reach: float = 0.05
  plain_floor: bool = False
  zoom: float = 1.0
  processes: int | None = None  # render workers; None: one per core


def make_config(*, seed: int, num_train: int, num_test: int, height: int,
                width: int, min_objects: int, max_objects: int,
                distinct_colors: bool = False, metal: bool = True, cube_scale: float = 1.0,
                shadow_lights: int = 1, sun_share: float = 0.0,
                contact_occlusion: float = 0.0, contact_reach: float = 0.05,
                plain_floor: bool = False, zoom: float = 1.0,
                processes: int | None = None) -> SyntheticClevrConfig:
  # The toy settings, the cubes' scale, the shadows and the zoom enter the name only when
  # set: CLEVR-like data keeps its name.
  toy = (("_distinct" if distinct_colors else "") + ("" if metal else "_rubber")
         + (f"_cubes{cube_scale:g}" if cube_scale != 1.0 else "")
         + (f"_shadowlights{shadow_lights}" if shadow_lights != 1 else "")
         + (f"_sun{sun_share:g}" if sun_share != 0.0 else "")
         + (f"_contact{contact_occlusion:g}-{contact_reach:g}" if contact_occlusion != 0.0
            else "")
         + ("_plainfloor" if plain_floor else "") + (f"_zoom{zoom:g}" if zoom != 1.0 else ""))
  name = (f"seed{seed}_{height}x{width}_train{num_train}_test{num_test}_"
          f"objects{min_objects}-{max_objects}{toy}_renderer{renderer.RENDERER_VERSION}")
  return SyntheticClevrConfig(
      name=name, seed=seed, num_train=num_train, num_test=num_test,
      height=height, width=width, min_objects=min_objects,
      max_objects=max_objects, distinct_colors=distinct_colors, metal=metal,
      cube_scale=cube_scale, shadow_lights=shadow_lights, sun_share=sun_share,
      contact_occlusion=contact_occlusion, contact_reach=contact_reach,
      plain_floor=plain_floor, zoom=zoom, processes=processes,
      description="Synthetic CLEVR-like scenes rendered by clevr_jax.data.renderer.")


def scene_seed(seed: int, split: str, index: int) -> int:
  """A distinct, reproducible seed for each (dataset seed, split, example)."""
  state = np.random.SeedSequence([seed, _SPLIT_IDS[split], index]).generate_state(2)
  return int(state[0]) << 32 | int(state[1])


class SyntheticClevr(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """CLEVR-like scenes with exact instance masks, in clevr_with_masks' schema."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self.dataset_info_from_configs(
        features=clevr_with_masks.compact_features(config.height, config.width))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    config = self.builder_config
    return {"train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test)}

  def _generate_examples(self, split: str, count: int
                         ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    config = self.builder_config
    scene_config = renderer.SceneConfig(
        height=config.height, width=config.width,
        min_objects=config.min_objects, max_objects=config.max_objects,
        distinct_colors=config.distinct_colors, metal=config.metal,
        cube_scale=config.cube_scale, shadow_lights=config.shadow_lights,
        sun_share=config.sun_share, contact_occlusion=config.contact_occlusion,
        contact_reach=config.contact_reach, plain_floor=config.plain_floor,
        zoom=config.zoom)
    seeds = [scene_seed(config.seed, split, i) for i in range(count)]
    scenes = renderer.render_scenes(seeds, scene_config, processes=config.processes)
    for index, scene in enumerate(scenes):
      yield index, clevr_with_masks.to_stored(scene, index)
