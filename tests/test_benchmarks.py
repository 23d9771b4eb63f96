"""Tests of the benchmark helpers: FLOP counts, timing, peaks, the PyTorch twin."""

import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clevr_jax import models
from benchmarks import pipeline_benchmark
from benchmarks import train_benchmark as tb

# A network small enough to compile in seconds on a loaded CPU.
TINY = dict(base_width=8, depth=1)
H, W = 16, 24


@pytest.mark.slow  # a child interpreter
@pytest.mark.parametrize('torch', [False, True])
def test_train_benchmark_imports_no_tensorflow(torch):
  # GPU machines may lack TensorFlow: none of these modules may pull it in.
  modules = ['benchmarks.train_benchmark', 'benchmarks.gpu_check']
  if torch:
    pytest.importorskip('torch')  # the `torch` extra; .ci/run installs it
    modules.append('benchmarks.torch_reference')
  code = (f"import sys, {', '.join(modules)}; "
          "print(sorted(m for m in sys.modules if m.startswith('tensorflow') "
          "or m == 'clevr_jax.data.pipeline'))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == '[]'


# --- FLOPs and peaks ---------------------------------------------------------


def _conv_flops(height, width, cin, cout, padding):
  x = jnp.ones((1, height, width, cin))
  k = jnp.ones((3, 3, cin, cout))
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  return tb.compiled_flops(conv.lower(x, k).compile())


@pytest.mark.parametrize('height,width,cin,cout', [(8, 12, 4, 5), (30, 40, 3, 8)])
def test_conv_flops_match_hand_count(height, width, cin, cout):
  # VALID: every output pixel does 9 * cin multiply-adds per output channel.
  valid = 2 * (height - 2) * (width - 2) * cin * cout * 9
  assert _conv_flops(height, width, cin, cout, 'VALID') == pytest.approx(valid, rel=0.02)
  # SAME: XLA skips the zero padding; the textbook 2*H*W*Cin*Cout*9 is an
  # upper bound, within the border's share.
  same = _conv_flops(height, width, cin, cout, 'SAME')
  exact = 2 * (3 * height - 2) * (3 * width - 2) * cin * cout
  textbook = 2 * height * width * cin * cout * 9
  assert same == pytest.approx(exact, rel=0.02)
  assert same == pytest.approx(textbook, rel=2 * (1 / height + 1 / width))


class _FakeCompiled:

  def __init__(self, analysis):
    self._analysis = analysis

  def cost_analysis(self):
    return self._analysis


def test_compiled_flops_accepts_dict_list_and_none():
  assert tb.compiled_flops(_FakeCompiled({'flops': 3.0, 'bytes accessed': 9.0})) == 3.0
  assert tb.compiled_flops(_FakeCompiled([{'flops': 3.0}, {'flops': 4.0}])) == 7.0
  assert tb.compiled_flops(_FakeCompiled(None)) is None
  assert tb.compiled_flops(_FakeCompiled({'bytes accessed': 9.0})) is None


def test_peak_flops_follow_the_device_row_and_the_precision():
  table = dict(tb.PEAK_FLOPS)
  # The first row whose name the device kind contains: a specific name ('H100
  # PCIe') must precede a shorter one it contains ('H100'), or it is never reached.
  names = [name.lower() for name, _ in tb.PEAK_FLOPS]
  assert not any(names[i] in names[j] for i in range(len(names))
                 for j in range(i + 1, len(names)))
  assert tb.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == table['H100 PCIe']['bfloat16']
  assert tb.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == table['H100']['bfloat16']
  assert table['H100 PCIe'] != table['H100']
  assert tb.peak_flops('cpu', 'bfloat16') is None
  # XLA's default precision lets float32 convolutions use TF32 tensor cores.
  assert tb.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == table['H100']['tf32']
  with jax.default_matmul_precision('highest'):
    assert tb.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == table['H100']['float32']
  for _, peaks in tb.PEAK_FLOPS:  # every row: the three precisions, fastest first
    assert peaks['bfloat16'] > peaks['tf32'] > peaks['float32']


# --- timing ------------------------------------------------------------------


class _Clock:
  """A fake `time` module whose perf_counter moves only when the test says so.

  Its steps are powers of two, so every time and difference is exact in float64.
  """

  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    return self.now

  def advance(self, seconds):
    self.now += seconds


def test_median_step_seconds_is_per_step_and_ignores_an_outlier(monkeypatch):
  clock, calls = _Clock(), []
  monkeypatch.setattr(tb, 'time', clock)

  def run(n):
    calls.append(n)
    clock.advance(1.0 if len(calls) == 1 else n / 64)  # one slow run, then 1/64 s a step

  assert tb.step_seconds(run, num_steps=4, repeats=3) == [0.25, 1 / 64, 1 / 64]
  assert calls == [4, 4, 4]
  calls.clear()
  # The median: per step and past the outlier (the mean would be 0.09375).
  assert tb.median_step_seconds(run, num_steps=4, repeats=3) == 1 / 64


def test_time_batches_counts_images_respects_limit_and_waits(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(pipeline_benchmark, 'time', clock)
  batches = [{'image': np.zeros((6, 4, 4, 3), np.uint8)} for _ in range(5)]  # 6 images each
  seen, finished = [], []

  def make_batches():
    clock.advance(0.5)  # the pipeline's start-up counts
    return iter(batches)

  def consume(batch):
    seen.append(batch)
    clock.advance(0.25)

  timing = pipeline_benchmark.time_batches(
      make_batches, consume, limit=4, finish=lambda: (clock.advance(1.0), finished.append(True)))
  assert (timing.batches, timing.images, len(seen), finished) == (4, 24, 4, [True])
  # Start-up, 4 batches of 0.25 s and the final wait; the first batch after start-up.
  assert (timing.first_batch_s, timing.total_s) == (0.75, 2.5)
  assert timing.images_per_s == 24 / 2.5
  whole = pipeline_benchmark.time_batches(lambda: iter(batches), lambda b: None)
  assert whole.batches == 5
  with pytest.raises(ValueError):
    pipeline_benchmark.time_batches(lambda: iter([]), lambda b: None)


def test_median_timing_and_verdict():
  timings = [pipeline_benchmark.Timing(1, n, 0.1, 1.0) for n in (30, 10, 20)]
  assert pipeline_benchmark.median_timing(timings).images == 20
  assert pipeline_benchmark.verdict(50, 100).startswith('input-bound')
  assert pipeline_benchmark.verdict(300, 100).startswith('not input-bound')


# --- the JAX step ------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_row():
  (row,) = tb.run([(H, W)], [TINY['base_width']], ['float32'], [2], num_steps=2,
                  repeats=2, depth=TINY['depth'])
  return row


def test_jax_benchmark_returns_consistent_positive_rows(tiny_row):
  row = tiny_row
  devices = jax.device_count()
  assert (row.height, row.width, row.per_device_batch, row.devices) == (H, W, 2, devices)
  assert row.ms_per_step > 0 and row.compile_s > 0 and math.isfinite(row.loss)
  assert row.images_per_s > 0 and row.flops_per_step > 0 and row.flops_per_s > 0
  assert row.peak_fraction is None  # no peak is known for a CPU
  line = tb.format_row(row)
  assert line.count('|') == tb.table_header().splitlines()[0].count('|')


def test_train_step_flops_are_forward_and_backward_convolutions(tiny_row):
  # Depth 1, base 8: enc1 3->8->8 at HxW, bottleneck 8->16->16 at H/2xW/2,
  # dec1 (16 after the skip)->8->8 and the output 8->3 at HxW; 3x3 convs
  # counted without the zero padding, as XLA does.
  def conv(h, w, cin, cout):
    return 2 * (3 * h - 2) * (3 * w - 2) * cin * cout
  forward = (conv(H, W, 3, 8) + conv(H, W, 8, 8) + conv(H // 2, W // 2, 8, 16)
             + conv(H // 2, W // 2, 16, 16) + conv(H, W, 16, 8) + conv(H, W, 8, 8)
             + conv(H, W, 8, 3)) * tiny_row.per_device_batch
  # Backward costs about two forwards (input and weight gradients), and
  # BatchNorm, ReLU, pooling and AdamW add elementwise work on top.
  assert 3 * forward * 0.9 < tiny_row.flops_per_step < 3 * forward * 1.6


def _fixed_row():
  """A row made from fixed figures: 4 images a device, runs of 0.5, 0.25 and 1 s a step."""
  devices = jax.device_count()
  compiled = tb.CompiledStep(
      config=tb.bench_config(8, 'float32', H, W, depth=1), mesh=None, step=None, state=None,
      batch={'image': np.zeros((4 * devices, H, W, 3), np.uint8)}, compile_s=2.0, flops=3e9)
  return tb._row(compiled, [0.5, 0.25, 1.0], loss=0.125)  # pylint: disable=protected-access


def test_row_figures_from_fixed_times():
  row, devices = _fixed_row(), jax.device_count()
  assert (row.height, row.width, row.base_width, row.per_device_batch) == (H, W, 8, 4)
  assert (row.ms_per_step, row.ms_range, row.compile_s, row.loss) == (500, (250, 1000), 2.0, 0.125)
  # The median step takes 0.5 s: 8 images/s and 6e9 FLOP/s on each device.
  assert row.images_per_s == 8 * devices and row.flops_per_s == 6e9 * devices
  assert row.torch_ratio is None


def test_torch_figures_from_fixed_times():
  row = _fixed_row()
  tb._add_torch_times(row, warmup_s=3.0, times=[0.125, 0.5, 0.25])  # pylint: disable=protected-access
  # Median 0.25 s for the 4 images of one device: 16 images/s, twice JAX's 8 a device.
  assert (row.torch_warmup_s, row.torch_ms_per_step, row.torch_ms_range) == (3.0, 250, (125, 500))
  assert row.torch_images_per_s == 16 and row.torch_ratio == 0.5


# --- the PyTorch reference ---------------------------------------------------


@pytest.mark.parametrize('base_width,depth,skip', [(8, 4, True), (64, 4, True),
                                                   (2, 1, True), (8, 4, False)])
def test_torch_unet_has_the_jax_parameter_count(base_width, depth, skip):
  pytest.importorskip('torch')
  from benchmarks import torch_reference as tr  # pylint: disable=g-import-not-at-top
  model = tr.UNet(3, 3, base_width, depth, skip)
  assert tr.count_params(model) == tr.jax_param_count(3, 3, base_width, depth, skip)
  if (base_width, depth, skip) == (8, 4, True):
    assert tr.count_params(model) == 487_489  # the poster's network


def test_torch_unet_computes_the_jax_function():
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference as tr  # pylint: disable=g-import-not-at-top
  net = models.UNet(3, base_width=2, depth=2)
  x = np.random.default_rng(0).random((2, H, W, 3), dtype=np.float32)
  variables = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(1, impl='rbg'), x)
  # Shift every variable so that biases and BatchNorm offsets are nonzero.
  variables = jax.tree_util.tree_map(lambda v: v + 0.1, variables)
  expected, _ = jax.jit(lambda v, x: net.apply(
      v, x, train=True, mutable=['batch_stats'])[0])(variables, x)
  model = tr.build_unet(3, 3, base_width=2, depth=2)
  tr.load_flax_variables(model, variables['params'], variables['batch_stats'])
  model.train()
  with torch.no_grad():
    got = model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  scale = np.abs(np.asarray(expected)).max()
  np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5 * scale)


def test_torch_columns_are_filled_with_positive_throughput(tiny_row):
  pytest.importorskip('torch')
  row = tb.add_torch(tiny_row, num_steps=2, repeats=2, depth=TINY['depth'])
  assert row.torch_ms_per_step > 0 and row.torch_warmup_s > 0
  assert row.torch_images_per_s > 0 and row.torch_ratio > 0
  assert tb.format_row(row, torch=True).count('|') == tb.table_header(
      torch=True).splitlines()[0].count('|')


# --- the input pipeline ------------------------------------------------------


def test_pipeline_benchmark_runs_on_the_test_preset(tmp_path):
  from configs import unet_rgb  # pylint: disable=g-import-not-at-top
  config = unet_rgb.get_config('test')
  config.data.data_dir = str(tmp_path)
  result = pipeline_benchmark.run(config, cached_epochs=2, step_images_per_s=1e9,
                                  device_resident=True)
  steps_per_epoch = config.data.synthetic.num_train // config.batch_size
  assert result.first_epoch.batches == result.cached.batches == steps_per_epoch
  assert result.first_epoch.images == steps_per_epoch * config.batch_size
  assert result.first_epoch.images_per_s > 0 and result.cached.images_per_s > 0
  assert result.prepare_s > 0 and result.loop is None
  assert result.verdicts().startswith('cached: input-bound')  # nothing feeds 1e9/s
  assert 'given' in result.table()
  # Reconstruction: the uint8 image only, 3 bytes a pixel.
  assert result.bytes_per_image == 3 * config.data.image_height * config.data.image_width
  assert result.resident.batches == steps_per_epoch


# --- the GPU check -------------------------------------------------------------


@pytest.mark.slow  # every part of the GPU check, end to end: the fast tier's longest test
@pytest.mark.parametrize('torch', [False, True])
def test_gpu_check_runs_every_part_in_reduced_mode(tmp_path, torch):
  from benchmarks import gpu_check  # pylint: disable=g-import-not-at-top
  if torch:
    pytest.importorskip('torch')  # the `torch` extra; .ci/run installs it
  out = tmp_path / 'check.md'
  lines = gpu_check.run(gpu_check.Plan.reduced(), str(out), torch=torch,
                        label='reduced', log=lambda _: None)
  parts = [line.part for line in lines]
  plan = gpu_check.Plan.reduced()
  assert parts.count('train step') == len(plan.base_widths) * len(plan.dtypes)
  assert parts[-5:] == ['K-Means', 'evaluation protocol', 'full protocol',
                        'Slot Attention step', 'peak device memory']
  slot = lines[-2]
  assert 'global batch 2' in slot.setting and 'images/s' in slot.ours
  assert 'compiled step memory' in slot.note and 'n/a' not in slot.note
  text = out.read_text()
  assert text.count('\n|') == len(lines) + 2  # header, rule, one row per line
  assert 'images/s' in text and 'Seconds per part' in text
  for line in lines[-4:-2]:  # the raw-pixel baseline is scored
    assert 'mIoU (oracle K) nan' not in line.note
  assert '4 segmenters' in lines[-3].setting
  assert 'scikit-learn' in lines[-5].reference  # the test extra
  train_steps = [l for l in lines if l.part == 'train step']
  assert all(l.reference.startswith('PyTorch') == torch for l in train_steps)

