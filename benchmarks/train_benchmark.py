r"""Throughput of the real train step, optionally beside a PyTorch reference.

  python -m benchmarks.train_benchmark [--sizes=240x320]
      [--base_widths=8,64] [--dtypes=float32,bfloat16]
      [--per_device_batch=1,2,4,8,10] [--steps=20 --repeats=5] [--torch]
      [--full]

The step is the one train.py runs, `train_step.make_train_step` (jit over
shard_map on the mesh of all devices, state donated), of the poster's U-Net
(reconstruction, MSE, AdamW), fed what the pipeline sends it (random uint8
images, `samples.random_stored`; the step derives its float input on the device),
per-device batch swept. Without flags a CPU runs a short sweep
(base width 8, per-device batch 1 and 2, both dtypes, few steps: minutes); an
accelerator, or `--full`, runs base widths 8 (the poster) and 64 (the original
U-Net paper) with per-device batch 1, 2, 4, 8, 10. Explicit flags override
either.

Columns: ms per step (median over `--repeats` runs of `--steps` back-to-back
steps, with the fastest and slowest run: on a shared host the spread is the
noise; compile excluded and reported separately; the runs of all rows are
interleaved, round by round, so that load from other processes hits every row
alike), images/s (global batch / step time), FLOP/s achieved (XLA's cost
analysis of the compiled step, times the devices, over the step time) and, on
a known accelerator, the fraction of its dense peak. With `--torch` the same network and step in PyTorch
(`torch_reference.py`) run on the same device kind in the same process, and a
ratio column gives JAX images/s per device over PyTorch images/s (> 1: JAX is
faster). With `--torch`, JAX does not preallocate GPU memory (the two share the
device), and on a CPU OMP_WAIT_POLICY defaults to PASSIVE: PyTorch's spinning
OpenMP threads make its times swing wildly on a shared host.

Imports neither TensorFlow nor `clevr_jax.data.pipeline`: GPU machines may
lack TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from benchmarks import samples
from clevr_jax import defaults
from clevr_jax import models
from clevr_jax import sharding
from clevr_jax.training import batch as batch_lib
from clevr_jax.training import state as state_lib
from clevr_jax.training import train_step as train_step_lib

_SIZES = flags.DEFINE_list('sizes', ['240x320'], 'Image sizes as HxW.')
_BASE_WIDTHS = flags.DEFINE_list(
    'base_widths', None, 'U-Net base widths (default: 8 on CPU; 8,64 on an '
    'accelerator or with --full).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'],
                            'Compute dtypes (parameters stay float32).')
_PER_DEVICE_BATCH = flags.DEFINE_list(
    'per_device_batch', None, 'Per-device batch sizes (default: 1,2 on CPU; '
    '1,2,4,8,10 on an accelerator or with --full).')
_STEPS = flags.DEFINE_integer(
    'steps', None, 'Back-to-back steps per timed run (default: 2 on CPU, 20 '
    'otherwise).')
_REPEATS = flags.DEFINE_integer(
    'repeats', 5, 'Timed runs; the median is reported, with the range.')
_FULL = flags.DEFINE_bool('full', False, 'The whole sweep, even on a CPU.')
_TORCH = flags.DEFINE_bool('torch', False,
                           'Also time the PyTorch reference step.')
_TORCH_CHANNELS_LAST = flags.DEFINE_bool(
    'torch_channels_last', None, 'PyTorch in channels-last memory format '
    '(default: on CUDA only, where cuDNN prefers it for tensor cores).')

# Dense (no sparsity) peak FLOP/s per device from NVIDIA's datasheets, looked up
# by a substring of jax's `device_kind`, most specific first. 'tf32' is the
# tensor-core rate that float32 convolutions get at XLA's default precision.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ('H100 PCIe', {'bfloat16': 756e12, 'tf32': 378e12, 'float32': 51e12}),
    ('H100 NVL', {'bfloat16': 835e12, 'tf32': 418e12, 'float32': 60e12}),
    ('H100', {'bfloat16': 989e12, 'tf32': 495e12, 'float32': 67e12}),  # SXM
    ('H200', {'bfloat16': 989e12, 'tf32': 495e12, 'float32': 67e12}),
    ('A100', {'bfloat16': 312e12, 'tf32': 156e12, 'float32': 19.5e12}),
)
# jax_default_matmul_precision values that keep float32 convolutions in float32.
_FULL_FLOAT32 = ('highest', 'float32', 'F32_F32_F32')


def parse_size(size: str) -> tuple[int, int]:
  height, width = size.lower().split('x')
  return int(height), int(width)


def float32_peak_key() -> str:
  """Which peak float32 rows are held against, given jax's default precision."""
  precision = jax.config.jax_default_matmul_precision
  return 'float32' if precision in _FULL_FLOAT32 else 'tf32'


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one device for `dtype`, or None if unknown (CPU)."""
  key = float32_peak_key() if dtype == 'float32' else dtype
  for name, peaks in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peaks.get(key)
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled computation, per device, from XLA.

  jax 0.10 returns a dict; older versions a list with one dict per program.
  Under shard_map the program is the per-device one, so multiply by the
  devices for the global figure.
  """
  analysis = compiled.cost_analysis()
  if analysis is None:
    return None
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = [a['flops'] for a in analysis if a and 'flops' in a]
  return float(sum(flops)) if flops else None


def step_seconds(run: Callable[[int], Any], num_steps: int, repeats: int
                 ) -> list[float]:
  """Per-step seconds of each of `repeats` calls of `run(num_steps)`.

  `run` must block until its steps are done. Steps within a call are issued
  back to back, as in training, so dispatch overlaps with computation.
  """
  per_step = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(num_steps)
    per_step.append((time.perf_counter() - start) / num_steps)
  return per_step


def median_step_seconds(run: Callable[[int], Any], num_steps: int,
                        repeats: int) -> float:
  return statistics.median(step_seconds(run, num_steps, repeats))


def bench_config(base_width: int, dtype: str, height: int, width: int,
                 depth: int = 4) -> ml_collections.ConfigDict:
  """The poster's reconstruction config with the benchmarked model and size."""
  config = defaults.get_config()
  config.model.base_width = base_width
  config.model.depth = depth
  config.model.dtype = dtype
  config.data.image_height, config.data.image_width = height, width
  return config


@functools.cache
def _host_state(config_key: tuple[Any, ...]) -> Any:
  """A fresh state on the host (numpy), one per network: `state.create_state`.

  Numpy, because a device array put on the mesh unchanged could be the very
  buffer the donating step deletes.
  """
  base_width, depth, grayscale, task = config_key
  config = bench_config(base_width, 'float32', 2**depth, 2**depth, depth)
  config.data.grayscale, config.task = grayscale, task
  return state_lib.create_state(config, train_step_lib.make_optimizer(config, 1))


@dataclasses.dataclass
class CompiledStep:
  """The train step train.py builds, compiled for one config and batch, with its state."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  step: Any  # the compiled executable; donates `state`
  state: state_lib.TrainState
  batch: dict[str, jax.Array]
  compile_s: float
  flops: float | None  # per device per step

  @property
  def global_batch_size(self) -> int:
    return next(iter(self.batch.values())).shape[0]

  def run(self, num_steps: int) -> float:
    """`num_steps` steps on the fixed batch; blocks and returns the last loss."""
    metrics = None
    for _ in range(num_steps):
      self.state, metrics = self.step(self.state, self.batch, {})
    return self._finish(metrics)

  def step_on(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Dispatches one step on a host batch as the pipeline yields it (stored fields)."""
    self.state, metrics = self.step(self.state, sharding.to_global(host_batch, self.mesh), {})
    return metrics

  def wait(self) -> None:
    jax.block_until_ready(self.state)

  def _finish(self, metrics: dict[str, jax.Array] | None) -> float:
    if metrics is None:
      return float('nan')
    self.wait()
    return float(metrics['loss'])


def compile_step(config: ml_collections.ConfigDict, per_device_batch: int,
                 seed: int = 0) -> CompiledStep:
  """Builds the mesh, state and a batch in the pipeline's form, and compiles the real step.

  The batch holds the stored fields the step is sent in training
  (`batch.fields(config, 'train')`: uint8 images, for reconstruction), random,
  so that the benchmark needs no dataset (nor TensorFlow).
  """
  mesh = sharding.make_mesh()
  model = models.make_model(config, axis_name=sharding.AXIS)
  tx = train_step_lib.make_optimizer(config, total_steps=1000)
  state = sharding.replicate(_host_state(
      (config.model.base_width, config.model.depth, config.data.grayscale, config.task)),
      mesh)
  per_process = per_device_batch * jax.local_device_count()
  host_batch = samples.random_stored(config, per_process,
                                     batch_lib.fields(config, 'train'), seed=seed)
  batch = sharding.to_global(host_batch, mesh)
  train_step = train_step_lib.make_train_step(config, model, tx, mesh)
  start = time.perf_counter()
  compiled = train_step.lower(state, batch, {}).compile()
  compile_s = time.perf_counter() - start
  return CompiledStep(config=config, mesh=mesh, step=compiled, state=state,
                      batch=batch, compile_s=compile_s,
                      flops=compiled_flops(compiled))


@dataclasses.dataclass
class Row:
  height: int
  width: int
  base_width: int
  dtype: str
  per_device_batch: int
  devices: int
  compile_s: float
  ms_per_step: float  # median
  ms_range: tuple[float, float]  # fastest and slowest run: the noise
  images_per_s: float
  flops_per_step: float | None  # per device
  flops_per_s: float | None  # all devices
  peak_fraction: float | None
  loss: float
  torch_warmup_s: float | None = None
  torch_ms_per_step: float | None = None
  torch_ms_range: tuple[float, float] | None = None
  torch_images_per_s: float | None = None

  @property
  def torch_ratio(self) -> float | None:
    """JAX images/s per device over PyTorch's (one device)."""
    if not self.torch_images_per_s:
      return None
    return self.images_per_s / self.devices / self.torch_images_per_s


def _row(compiled: CompiledStep, times: Sequence[float], loss: float) -> Row:
  config = compiled.config
  seconds = statistics.median(times)
  devices = jax.device_count()
  flops_per_s = peak_fraction = None
  if compiled.flops:
    flops_per_s = compiled.flops * devices / seconds
    peak = peak_flops(jax.devices()[0].device_kind, config.model.dtype)
    if peak:
      peak_fraction = compiled.flops / seconds / peak
  return Row(height=config.data.image_height, width=config.data.image_width,
             base_width=config.model.base_width, dtype=config.model.dtype,
             per_device_batch=compiled.global_batch_size // devices,
             devices=devices, compile_s=compiled.compile_s,
             ms_per_step=1e3 * seconds,
             ms_range=(1e3 * min(times), 1e3 * max(times)),
             images_per_s=compiled.global_batch_size / seconds,
             flops_per_step=compiled.flops, flops_per_s=flops_per_s,
             peak_fraction=peak_fraction, loss=loss)


def _add_torch_times(row: Row, warmup_s: float, times: Sequence[float]) -> None:
  seconds = statistics.median(times)
  row.torch_warmup_s = warmup_s
  row.torch_ms_per_step = 1e3 * seconds
  row.torch_ms_range = (1e3 * min(times), 1e3 * max(times))
  row.torch_images_per_s = row.per_device_batch / seconds


def _torch_runner(config: ml_collections.ConfigDict, per_device_batch: int,
                  channels_last: bool | None) -> Any:
  """The PyTorch twin of `config`'s step on one device, warmed up."""
  # Optional dependency: imported only when asked for.
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  return torch_reference.make_runner(
      base_width=config.model.base_width, depth=config.model.depth,
      dtype=config.model.dtype, batch=per_device_batch,
      height=config.data.image_height, width=config.data.image_width,
      channels_last=channels_last)


def add_torch(row: Row, num_steps: int, repeats: int,
              channels_last: bool | None = None, depth: int = 4) -> Row:
  """Fills the PyTorch columns of `row` (same network, batch and dtype)."""
  config = bench_config(row.base_width, row.dtype, row.height, row.width, depth)
  runner = _torch_runner(config, row.per_device_batch, channels_last)
  _add_torch_times(row, runner.warmup_s, step_seconds(runner.run, num_steps, repeats))
  runner.release()
  return row


def run(sizes: Sequence[tuple[int, int]], base_widths: Sequence[int],
        dtypes: Sequence[str], batches: Sequence[int], num_steps: int,
        repeats: int, *, torch: bool = False,
        torch_channels_last: bool | None = None, depth: int = 4,
        verbose: bool = False) -> list[Row]:
  """Every combination, timed in interleaved rounds.

  Everything is compiled (and warmed up) first; then each of `repeats` rounds
  times `num_steps` steps of every configuration in turn, so that a burst of
  load from other processes lands on all rows alike rather than on one.
  """
  compiled_steps = []
  for height, width in sizes:
    for base_width in base_widths:
      for dtype in dtypes:
        config = bench_config(base_width, dtype, height, width, depth)
        for batch in batches:
          compiled = compile_step(config, batch)
          compiled.run(1)
          compiled_steps.append(compiled)
          if verbose:
            print(f'compiled {height}x{width} base {base_width} {dtype} batch '
                  f'{batch} in {compiled.compile_s:.1f} s', flush=True)
  runners = []
  if torch:
    devices = jax.device_count()
    runners = [_torch_runner(c.config, c.global_batch_size // devices,
                             torch_channels_last) for c in compiled_steps]
  times = [[] for _ in compiled_steps]
  torch_times = [[] for _ in runners]
  for round_index in range(repeats):
    for i, compiled in enumerate(compiled_steps):
      times[i] += step_seconds(compiled.run, num_steps, 1)
      if runners:
        torch_times[i] += step_seconds(runners[i].run, num_steps, 1)
    if verbose:
      print(f'round {round_index + 1}/{repeats} done', flush=True)
  rows = [_row(c, t, c.run(1)) for c, t in zip(compiled_steps, times)]
  for row, runner, t in zip(rows, runners, torch_times):
    _add_torch_times(row, runner.warmup_s, t)
    runner.release()
  return rows


def _si(value: float | None, unit: str = '') -> str:
  if value is None:
    return 'n/a'
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M')):
    if value >= scale:
      return f'{value / scale:.2f} {prefix}{unit}'
  return f'{value:.3g} {unit}'.strip()


def _ms(median: float, span: tuple[float, float]) -> str:
  digits = 1 if median < 100 else 0
  return f'{median:.{digits}f} ({span[0]:.{digits}f}-{span[1]:.{digits}f})'


def table_header(torch: bool = False) -> str:
  columns = ['size', 'base width', 'dtype', 'per-device batch', 'compile (s)',
             'ms/step (min-max)', 'images/s', 'FLOP/step (per device)', 'FLOP/s',
             'of peak']
  if torch:
    columns += ['torch warm-up (s)', 'torch ms/step (min-max)', 'torch images/s',
                'JAX/PyTorch (images/s per device)']
  return ('| ' + ' | '.join(columns) + ' |\n'
          + '|' + '---|' * len(columns))


def format_row(row: Row, torch: bool = False) -> str:
  fraction = (f'{100 * row.peak_fraction:.1f}%' if row.peak_fraction
              is not None else 'n/a')
  cells = [f'{row.height}x{row.width}', str(row.base_width), row.dtype,
           str(row.per_device_batch), f'{row.compile_s:.1f}',
           _ms(row.ms_per_step, row.ms_range), f'{row.images_per_s:.1f}',
           _si(row.flops_per_step), _si(row.flops_per_s), fraction]
  if torch:
    cells += [f'{row.torch_warmup_s:.1f}',
              _ms(row.torch_ms_per_step, row.torch_ms_range),
              f'{row.torch_images_per_s:.1f}', f'{row.torch_ratio:.2f}']
  return '| ' + ' | '.join(cells) + ' |'


def load_average() -> str:
  """The host's 1/5/15-minute load: other processes skew CPU timings."""
  return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def describe_device() -> str:
  device = jax.devices()[0]
  return (f'jax {jax.__version__}, {jax.device_count()} x {device.device_kind} '
          f'({device.platform}), {os.cpu_count()} host CPUs')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _TORCH.value:
    # Both frameworks share the GPU: JAX must not take 75% of it up front.
    # Effective only before JAX's first use of its backend, i.e. here.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  on_cpu = jax.devices()[0].platform == 'cpu'
  short = on_cpu and not _FULL.value
  base_widths = _BASE_WIDTHS.value or (['8'] if short else ['8', '64'])
  batches = _PER_DEVICE_BATCH.value or (
      ['1', '2'] if short else ['1', '2', '4', '8', '10'])
  num_steps = _STEPS.value or (2 if on_cpu else 20)
  repeats = _REPEATS.value
  if _TORCH.value:
    if on_cpu:
      # PyTorch's OpenMP threads spin while they wait; on a shared CPU that
      # made one row's runs range from 114 ms to 7.3 s here. Must be set
      # before torch is imported; an explicit setting wins.
      os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    try:
      from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise SystemExit(f'--torch: {e}') from e
    print(f"{torch_reference.describe_device()}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")
  print(f'{describe_device()}; load average {load_average()}')
  note = (f'{num_steps} steps per run, median of {repeats} runs, interleaved '
          'across rows')
  if peak_flops(jax.devices()[0].device_kind, 'bfloat16'):
    note += f'; float32 rows against the {float32_peak_key()} peak'
  print(note)
  rows = run([parse_size(s) for s in _SIZES.value],
              [int(w) for w in base_widths], _DTYPES.value,
              [int(b) for b in batches], num_steps, repeats, torch=_TORCH.value,
              torch_channels_last=_TORCH_CHANNELS_LAST.value, verbose=True)
  print(table_header(_TORCH.value))
  for row in rows:
    print(format_row(row, _TORCH.value))
  print(f'load average at the end {load_average()}')


if __name__ == '__main__':
  app.run(main)
