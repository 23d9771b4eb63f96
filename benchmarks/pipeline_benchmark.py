r"""Is training input-bound? tf.data's delivery rate beside the train step's.

  python -m benchmarks.pipeline_benchmark \
      [--config=configs/unet_rgb.py:quick] [--batches=0] [--cached_epochs=3]
      [--step_images_per_s=...]

Prepares the configured dataset if needed (`pipeline.prepare`; the `quick`
preset renders its synthetic scenes in about a minute), then times, on the
host batches `pipeline.Split(config, 'train').train_batches` yields (the
stored fields the train step reads, `batch.fields(config, 'train')`: uint8
images for reconstruction), each made global device arrays with
`sharding.to_global` as train.py does (unless `--nodevice_put`):

  - the first epoch: tf.data reads and decodes the split (with
    config.data.cache into host arrays, from which its batches are gathered);
  - later epochs from the cache: batches gathered from the host arrays at
    a NumPy permutation from (seed, epoch) (median of `--cached_epochs`);
  - with `--device_resident`, the split put on the devices once and each
    batch's positions sent instead (config.data.device_resident);
  - the train step alone on random images of the same shape (compiled once;
    or `--step_images_per_s`, e.g. a GPU's figure from train_benchmark);
  - the train loop: the pipeline feeding the step, sharing the host.

`--batches` caps the batches of the cached epochs and of the train loop (0: a
whole epoch, its start-up included; the first epoch is always read whole so
that the cache is filled). Training is input-bound when the pipeline delivers
fewer images/s than the step consumes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from clevr_jax import sharding
from clevr_jax.training import batch as batch_lib
from benchmarks import train_benchmark
from clevr_jax.data import pipeline

# configs/ beside the package, in a checkout.
_QUICK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'unet_rgb.py') + ':quick'
_CONFIG = config_flags.DEFINE_config_file(
    'config', _QUICK, 'A configs/*.py file, optionally with :preset.')
_BATCHES = flags.DEFINE_integer(
    'batches', 0, 'Batches per cached epoch and in the train loop (0: a whole '
    'epoch).')
_CACHED_EPOCHS = flags.DEFINE_integer(
    'cached_epochs', 3, 'Epochs timed after the first; the median is reported.')
_DEVICE_PUT = flags.DEFINE_bool(
    'device_put', True, 'Put every delivered batch on the devices, as train.py '
    'does (off: tf.data alone).')
_STEP_IMAGES_PER_S = flags.DEFINE_float(
    'step_images_per_s', None, 'What the train step consumes, if measured '
    'elsewhere (e.g. on a GPU); skips timing the step and the train loop here.')
_DEVICE_RESIDENT = flags.DEFINE_bool(
    'device_resident', False, 'Also time the device-resident path (positions only).')
_STEP_STEPS = flags.DEFINE_integer('step_steps', 5, 'Steps per timed run of the step.')
_STEP_REPEATS = flags.DEFINE_integer('step_repeats', 5, 'Timed runs of the step (median).')


@dataclasses.dataclass
class Timing:
  """A stretch of batches: how many, how many images, how long."""
  batches: int
  images: int
  first_batch_s: float  # from asking for the iterator to batch 1 consumed
  total_s: float

  @property
  def images_per_s(self) -> float:
    return self.images / self.total_s

  @property
  def ms_per_batch(self) -> float:
    return 1e3 * self.total_s / self.batches


def time_batches(make_batches: Callable[[], Iterator[dict[str, np.ndarray]]],
                 consume: Callable[[dict[str, np.ndarray]], Any],
                 limit: int = 0, finish: Callable[[], Any] | None = None
                 ) -> Timing:
  """Times `consume` over the first `limit` (0: all) batches of a new iterator.

  The clock starts before the iterator is made, so the pipeline's start-up
  (e.g. filling the shuffle buffer) counts, as it does in training; it stops
  after `finish()` (e.g. waiting for steps dispatched asynchronously).
  """
  start = time.perf_counter()
  batches = make_batches()
  if limit:
    batches = itertools.islice(batches, limit)
  count = images = 0
  first = None
  for batch in batches:
    consume(batch)
    if first is None:
      first = time.perf_counter() - start
    count += 1
    images += len(next(iter(batch.values())))  # flat: [per-process batch, ...]
  if not count:
    raise ValueError('the iterator yielded no batches')
  if finish is not None:
    finish()
  return Timing(batches=count, images=images, first_batch_s=first,
                total_s=time.perf_counter() - start)


def median_timing(timings: Sequence[Timing]) -> Timing:
  """The timing of median throughput (a real run, not a blend of several)."""
  ordered = sorted(timings, key=lambda t: t.images_per_s)
  return ordered[(len(ordered) - 1) // 2]


def verdict(pipeline_images_per_s: float, step_images_per_s: float) -> str:
  ratio = pipeline_images_per_s / step_images_per_s
  if ratio < 1:
    return (f'input-bound: the pipeline delivers {ratio:.2f}x what the step '
            'consumes')
  return (f'not input-bound: the pipeline delivers {ratio:.1f}x what the step '
          'consumes')


def _row(stage: str, timing: Timing | None, images_per_s: float | None = None,
         note: str = '') -> str:
  if timing is None:
    cells = [stage, '-', f'{images_per_s:.1f}', '-', '-', note]
  else:
    cells = [stage, str(timing.batches), f'{timing.images_per_s:.1f}',
             f'{timing.ms_per_batch:.1f}', f'{timing.first_batch_s:.2f}', note]
  return '| ' + ' | '.join(cells) + ' |'


@dataclasses.dataclass
class Result:
  description: str
  prepare_s: float | None  # None: the dataset was there already
  first_epoch: Timing
  cached: Timing  # the median cached epoch
  step_images_per_s: float
  bytes_per_image: int  # host bytes sent per training image
  step_note: str = ''  # how the step's figure was obtained
  loop: Timing | None = None  # None when the step's figure was given
  resident: Timing | None = None  # positions of a device-resident split

  def table(self) -> str:
    rows = [
        '| stage | batches | images/s | ms/batch | first batch (s) | note |',
        '|---|---|---|---|---|---|',
        _row('first epoch (tf.data reads and decodes; fills the cache)', self.first_epoch,
             note=('dataset already prepared' if self.prepare_s is None
                   else f'prepared in {self.prepare_s:.1f} s')),
        _row('cached epoch (median), as device arrays', self.cached,
             note=f'{self.bytes_per_image / 1e3:.1f} kB per image sent')]
    if self.resident is not None:
      rows.append(_row('device-resident split (positions sent)', self.resident))
    rows.append(_row('train step alone', None, self.step_images_per_s, self.step_note))
    if self.loop is not None:
      rows.append(_row(
          'train loop (tf.data feeding the step)', self.loop,
          note=f'{self.loop.images_per_s / self.step_images_per_s:.2f}x the step alone'))
    return '\n'.join(rows)

  def verdicts(self) -> str:
    return (f'cached: {verdict(self.cached.images_per_s, self.step_images_per_s)}; '
            f'first epoch: {verdict(self.first_epoch.images_per_s, self.step_images_per_s)}')


def run(config: Any, *, batches: int = 0, cached_epochs: int = 3,
        device_put: bool = True, step_images_per_s: float | None = None,
        step_steps: int = 5, step_repeats: int = 5,
        device_resident: bool = False) -> Result:
  """Prepares the data if needed, then times the stages (see module docstring)."""
  mesh = sharding.make_mesh()
  per_device = pipeline.per_device_batch(config.batch_size, jax.process_count(),
                                         jax.local_device_count())
  start = time.perf_counter()
  was_prepared = pipeline.make_builder(config).is_prepared()
  builder = pipeline.prepare(config)
  prepare_s = None if was_prepared else time.perf_counter() - start
  split = pipeline.Split(config, 'train')
  fields = batch_lib.fields(config, 'train')
  description = (
      f'{builder.name}/{builder.builder_config.name}: {split.num_examples} train '
      f'images {config.data.image_height}x{config.data.image_width}, global batch '
      f'{config.batch_size}, cache={config.data.cache}, fields sent {list(fields)}, '
      f'made device arrays: {device_put}')

  def to_devices(host_batch):
    if device_put:
      jax.block_until_ready(sharding.to_global(host_batch, mesh))

  epochs = itertools.count()
  make = lambda: split.train_batches(next(epochs), fields=fields)
  first = time_batches(make, to_devices)  # whole: a partial read fills no cache
  cached = median_timing([time_batches(make, to_devices, batches)
                          for _ in range(cached_epochs)])
  sample = next(make())
  bytes_per_image = sum(v.nbytes for v in sample.values()) // len(sample['image'])
  resident = None
  if device_resident:
    data = batch_lib.DeviceData(split.train_arrays(fields), mesh)
    gather = batch_lib.make_gather(mesh)

    def gathered(host_batch):
      jax.block_until_ready(gather(data.arrays, sharding.to_global(host_batch, mesh)))

    resident = median_timing([
        time_batches(lambda: split.train_batches(next(epochs), positions_only=True),
                     gathered, batches)
        for _ in range(cached_epochs)])
  if step_images_per_s:
    return Result(description, prepare_s, first, cached, step_images_per_s,
                  bytes_per_image, 'given', resident=resident)
  compiled = train_benchmark.compile_step(config, per_device)
  compiled.run(1)
  times = train_benchmark.step_seconds(compiled.run, step_steps, step_repeats)
  seconds = statistics.median(times)
  loop = time_batches(make, compiled.step_on, batches, compiled.wait)
  return Result(description, prepare_s, first, cached,
                compiled.global_batch_size / seconds, bytes_per_image,
                f'uint8 batch: {1e3 * seconds:.0f} ms/step (runs '
                f'{1e3 * min(times):.0f}-{1e3 * max(times):.0f}), compile '
                f'{compiled.compile_s:.1f} s', loop, resident)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  print(f'{train_benchmark.describe_device()}; load average '
        f'{train_benchmark.load_average()}', flush=True)
  result = run(_CONFIG.value, batches=_BATCHES.value,
               cached_epochs=_CACHED_EPOCHS.value, device_put=_DEVICE_PUT.value,
               step_images_per_s=_STEP_IMAGES_PER_S.value,
               step_steps=_STEP_STEPS.value, step_repeats=_STEP_REPEATS.value,
               device_resident=_DEVICE_RESIDENT.value)
  print(result.description)
  print(result.table())
  print(f'{result.verdicts()}. Load average at the end {train_benchmark.load_average()}.')


if __name__ == '__main__':
  app.run(main)
