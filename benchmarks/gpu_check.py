r"""One prepared accelerator check: the train step, K-Means, the protocol and memory on a GPU.

  python -m benchmarks.gpu_check --out=gpu_check.md [--reduced]

TensorFlow-free (the lent GPU machines have JAX, flax, optax, orbax, numpy,
scipy and PyTorch, no TensorFlow): the data are rendered by the NumPy renderer,
not read through TFDS. Writes one markdown table to `--out` (rewritten after
each part, so a run cut short keeps what it measured) and prints it:

  1. train step: the step train.py runs, fed uint8 batches as the pipeline
     sends them, 240x320, base width 8 (the poster) and 64 (the U-Net paper),
     float32 and bfloat16: images/s and fraction of the device's peak, with
     the PyTorch twin's images/s beside it (`--torch`, when PyTorch is there);
  2. K-Means: ours (batched, on the device) against scikit-learn one image at
     a time on the raw pixels of rendered images (when scikit-learn is there);
  3. the evaluation protocol: `--protocol_images` synthetic 240x320 images,
     all 11 taps of a freshly initialised U-Net, oracle and fixed K, 10
     restarts: its wall time and images/s (the scores of an untrained network
     only say that it ran; the input tap's is a real baseline); then the full
     protocol, the four default segmenters (post-processing on the devices
     too; target under 60 s for 1,000 images on one H100);
  4. Slot Attention: one train step of the paper's model (clevr_jax/models/slot_attention.py,
     configs/slot_attention.py:paper) at its batch (64) and size (128x128), float32:
     images/s and the compiled step's device memory (arguments, outputs and
     temporaries, from XLA's memory analysis);
  5. peak device memory (JAX, and PyTorch's own).

Planned to take under 8 minutes on one H100/H200 (the Slot Attention step adds
about a minute: compiling, then 60 steps). `--reduced` runs every part
at toy sizes on any device, CPU included (about 2 minutes on this loaded 2-core
host, mostly compiling): the test suite runs it, so that the script keeps
working where no GPU is at hand.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from clevr_jax import defaults
from clevr_jax import models
from clevr_jax import schema
from clevr_jax import sharding
from clevr_jax.segmentation import kmeans
from clevr_jax.training import batch as batch_lib
from clevr_jax.training import state as state_lib
from clevr_jax.training import train_step
from benchmarks import samples
from benchmarks import train_benchmark
from clevr_jax.data import renderer

_OUT = flags.DEFINE_string('out', 'gpu_check.md', 'Markdown file to write.')
_REDUCED = flags.DEFINE_bool('reduced', False, 'Toy sizes: seconds on a CPU.')
# (train_benchmark, imported here, defines --torch and --per_device_batch.)
_SKIP_TORCH = flags.DEFINE_bool('skip_torch', False, 'No PyTorch twin beside the train '
                                'step (skipped anyway when PyTorch is not installed).')
_PROTOCOL_IMAGES = flags.DEFINE_integer('protocol_images', None,
                                        'Images of the protocol (default 1000; 8 reduced).')
_TRAIN_BATCH = flags.DEFINE_integer('train_batch', None,
                                    'Train-step batch per device (default 16; 2 reduced).')


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes of every part; `full()` for an accelerator, `reduced()` for the tests."""
  height: int = 240
  width: int = 320
  depth: int = 4
  base_widths: tuple[int, ...] = (8, 64)
  dtypes: tuple[str, ...] = ('float32', 'bfloat16')
  per_device_batch: int = 16
  steps: int = 20
  repeats: int = 3
  kmeans_images: int = 16
  restarts: int = 10
  max_iter: int = 300
  protocol_images: int = 1000
  eval_batch: int = 50
  # Slot Attention's step: the paper's global batch and image size; `slot_widths`
  # (encoder, slot, decoder channels) shrink the model only in reduced mode.
  slot_batch: int = 64
  slot_size: int = 128
  slot_widths: int = 0  # 0: the paper's model (defaults.slot_attention_config)

  @staticmethod
  def reduced() -> 'Plan':
    return Plan(height=32, width=48, depth=1, base_widths=(4,), per_device_batch=2,
                steps=1, repeats=1, kmeans_images=2, restarts=2, max_iter=20,
                protocol_images=8, eval_batch=4, slot_batch=2, slot_size=32, slot_widths=8)


@dataclasses.dataclass
class Line:
  part: str
  setting: str
  ours: str
  reference: str = 'n/a'
  ratio: str = 'n/a'
  note: str = ''


def table(lines: Sequence[Line], header: str) -> str:
  rows = ['| part | setting | ours | reference | ours / reference | note |',
          '|---|---|---|---|---|---|']
  rows += [f'| {l.part} | {l.setting} | {l.ours} | {l.reference} | {l.ratio} | {l.note} |'
           for l in lines]
  return header + '\n\n' + '\n'.join(rows) + '\n'


def _optional(module: str) -> Any:
  try:
    return __import__(module, fromlist=['_'])
  except ImportError:
    return None


# --- 1. the train step -----------------------------------------------------------


def train_step_lines(plan: Plan, torch: bool) -> list[Line]:
  rows = train_benchmark.run([(plan.height, plan.width)], plan.base_widths, plan.dtypes,
                             [plan.per_device_batch], plan.steps, plan.repeats,
                             torch=torch, depth=plan.depth)
  lines = []
  for row in rows:
    peak = f', {100 * row.peak_fraction:.1f}% of peak' if row.peak_fraction else ''
    lines.append(Line(
        'train step', f'{row.height}x{row.width}, base width {row.base_width}, {row.dtype}, '
        f'batch {row.per_device_batch} per device x {row.devices}',
        f'{row.images_per_s:.1f} images/s ({row.ms_per_step:.1f} ms{peak})',
        f'PyTorch {row.torch_images_per_s:.1f} images/s' if row.torch_images_per_s else 'n/a',
        f'{row.torch_ratio:.2f}' if row.torch_ratio else 'n/a',
        f'compile {row.compile_s:.1f} s; {train_benchmark._si(row.flops_per_s, "FLOP/s")}'))
  return lines


# --- rendered data -----------------------------------------------------------------


def render(plan: Plan, count: int, first_seed: int = 10_000) -> dict[str, np.ndarray]:
  """`count` synthetic scenes in the pipeline's stored form (batch.STORED)."""
  config = renderer.SceneConfig(height=plan.height, width=plan.width)
  processes = 1 if count <= 16 else None
  scenes = list(renderer.render_scenes(range(first_seed, first_seed + count), config,
                                       processes=processes))
  return {
      'image': np.stack([s['image'] for s in scenes]),
      'labels': np.stack([s['labels'] for s in scenes]),
      'shape': np.stack([s['shape'] for s in scenes]).astype(np.uint8),
      'visibility': np.stack([s['visibility'] > 0 for s in scenes]).astype(np.uint8),
      'valid': np.ones(count, bool),
      'index': np.arange(count, dtype=np.int32),
  }


class ArraySplit:
  """In-memory stored examples with the `eval_batches` of `pipeline.Split` (no TF)."""

  def __init__(self, arrays: dict[str, np.ndarray], eval_batch: int):
    self.arrays = arrays
    self.num_examples = len(arrays['index'])
    self.eval_batch = eval_batch

  def eval_batches(self, *, process_index: int = 0, process_count: int = 1,
                   max_examples: int = 0, fields: Sequence[str] | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    count = min(self.num_examples, max_examples) if max_examples else self.num_examples
    per_process = self.eval_batch // process_count
    for start in range(0, count, self.eval_batch):
      batch = {}
      for name in fields or batch_lib.STORED:
        x = self.arrays[name][start:min(start + self.eval_batch, count)]
        pad = self.eval_batch - len(x)
        batch[name] = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      own = slice(process_index * per_process, (process_index + 1) * per_process)
      yield {k: v[own] for k, v in batch.items()}


# --- 2. K-Means against scikit-learn ---------------------------------------------


def kmeans_lines(plan: Plan, images: np.ndarray) -> list[Line]:
  points = images.reshape(len(images), -1, 3).astype(np.float32) / 255
  b, n, _ = points.shape
  k = schema.MAX_SLOTS
  ks = np.full(b, k, np.int32)
  keys = jax.random.split(jax.random.key(0), b)
  run = lambda: jax.block_until_ready(kmeans.kmeans(
      points, ks, keys, k_max=k, num_restarts=plan.restarts, max_iter=plan.max_iter,
      metric='euclidean'))
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  start = time.perf_counter()
  result = run()
  ours = time.perf_counter() - start
  line = Line('K-Means', f'{b} images of {n}x3 (raw pixels), K={k}, {plan.restarts} '
              'restarts, euclidean', f'{1e3 * ours:.0f} ms for the batch',
              note=f'compile {max(first - ours, 0):.1f} s; {np.mean(result.n_iter):.1f} '
              'iterations on average')
  cluster = _optional('sklearn.cluster')
  if cluster is None:
    line.note += '; scikit-learn not installed'
    return [line]
  start = time.perf_counter()
  fits = [cluster.KMeans(n_clusters=k, n_init=plan.restarts, max_iter=plan.max_iter,
                         random_state=i).fit(points[i]) for i in range(b)]
  theirs = time.perf_counter() - start
  inertia = [_inertia64(points[i], np.asarray(result.labels[i]), np.asarray(result.centroids[i]))
             / _inertia64(points[i], fits[i].labels_, fits[i].cluster_centers_)
             for i in range(b)]
  line.reference = f'scikit-learn {1e3 * theirs:.0f} ms one by one'
  line.ratio = f'{theirs / ours:.1f}x faster'
  line.note += f'; inertia ours/theirs mean {np.mean(inertia):.4f} (worst {max(inertia):.4f})'
  return [line]


def _inertia64(points: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
  x = np.asarray(points, np.float64)
  return float(np.sum((x - np.asarray(centroids, np.float64)[labels]) ** 2))


# --- 3. the evaluation protocol ---------------------------------------------------


POSTER_SEGMENTERS = ('kmeans', 'kmeans_fixed_k')


def protocol_config(plan: Plan, segmenter_names: Sequence[str] = POSTER_SEGMENTERS
                    ) -> ml_collections.ConfigDict:
  config = defaults.get_config()
  config.data.image_height, config.data.image_width = plan.height, plan.width
  config.model.depth = plan.depth
  config.model.base_width = plan.base_widths[0]
  config.eval.batch_size = plan.eval_batch
  config.eval.taps = models.tap_names(plan.depth)
  config.eval.kmeans.num_restarts = plan.restarts
  config.eval.kmeans.max_iter = plan.max_iter
  # The poster's segmenters (oracle K, fixed K), or the default ones (with the
  # post-processing on the devices too).
  config.eval.segmenter_names = tuple(segmenter_names)
  return config


def score_taps(config: ml_collections.ConfigDict, split: ArraySplit,
               state: state_lib.TrainState, model: models.UNet
               ) -> dict[str, dict[str, dict[str, float]]]:
  """{segmenter: {tap: {metric: mean}}} over the split: the repository's protocol
  (`evaluation.protocol.score_features`), through the configured segmenters."""
  from clevr_jax.evaluation import protocol  # pylint: disable=g-import-not-at-top
  from clevr_jax.segmentation import segmenters  # pylint: disable=g-import-not-at-top
  taps = tuple(config.eval.taps)
  predict = train_step.make_predict_fn(model, taps)
  table_, _ = protocol.score_features(
      config, sharding.make_mesh(), lambda batch: predict(state, batch['image'])[1], taps,
      split, segmenters.configured(config), what='GPU check protocol')
  return table_


def protocol_lines(plan: Plan, stored: dict[str, np.ndarray],
                   segmenter_names: Sequence[str] = POSTER_SEGMENTERS,
                   part: str = 'evaluation protocol') -> list[Line]:
  config = protocol_config(plan, segmenter_names)
  mesh = sharding.make_mesh()
  model = models.make_model(config)
  state = sharding.replicate(
      state_lib.create_state(config, train_step.make_optimizer(config, 1)), mesh)
  split = ArraySplit(stored, plan.eval_batch)
  start = time.perf_counter()
  scores = score_taps(config, split, state, model)
  seconds = time.perf_counter() - start
  count = split.num_examples
  raw = scores['kmeans']['input'].get('poster_miou', float('nan'))
  return [Line(
      part, f'{count} synthetic {plan.height}x{plan.width} images, '
      f'{len(config.eval.taps)} taps x {len(scores)} segmenters ({", ".join(scores)}), '
      f'{plan.restarts} restarts, '
      f'batch {plan.eval_batch}', f'{seconds:.1f} s, {count / seconds:.1f} images/s',
      note=f'untrained U-Net (base {config.model.base_width}); input-tap mIoU (oracle K) '
      f'{raw:.3f}; compiles included')]


# --- 4. Slot Attention ------------------------------------------------------------


def slot_attention_config(plan: Plan) -> ml_collections.ConfigDict:
  """The paper's model (the defaults' slot_attention fields) at the plan's size and batch."""
  config = defaults.get_config()
  config.model.architecture = 'slot_attention'
  config.data.image_height = config.data.image_width = plan.slot_size
  config.batch_size = plan.slot_batch
  if plan.slot_widths:
    sa = config.model.slot_attention
    sa.encoder_features = (plan.slot_widths,) * len(sa.encoder_features)
    sa.slot_size = sa.decoder_features = plan.slot_widths
    sa.mlp_hidden = 2 * plan.slot_widths
  return config


def slot_attention_lines(plan: Plan) -> list[Line]:
  config = slot_attention_config(plan)
  mesh = sharding.make_mesh()
  model = models.make_model(config, axis_name=sharding.AXIS)
  tx = train_step.make_optimizer(config, 1)
  state = sharding.replicate(state_lib.create_state(config, tx), mesh)
  host_batch = samples.random_stored(config, config.batch_size // jax.process_count(),
                                     batch_lib.fields(config, 'train'))
  batch = sharding.to_global(host_batch, mesh)
  step = train_step.make_train_step(config, model, tx, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch, {}).compile()
  compile_s = time.perf_counter() - start
  holder = {'state': state}

  def run(num_steps: int) -> None:
    for _ in range(num_steps):
      holder['state'], metrics = compiled(holder['state'], batch, {})
    jax.block_until_ready(metrics)

  run(1)  # warm
  seconds = train_benchmark.median_step_seconds(run, plan.steps, plan.repeats)
  memory = compiled.memory_analysis()
  used = 'n/a'
  if memory is not None:
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes)
    used = f'{total / 2**30:.2f} GiB'

  sa = config.model.slot_attention
  return [Line(
      'Slot Attention step', f'{plan.slot_size}x{plan.slot_size}, global batch '
      f'{plan.slot_batch} over {jax.device_count()} device(s), {sa.num_slots} slots, '
      f'{sa.num_iterations} iterations, width {sa.slot_size}, float32',
      f'{plan.slot_batch / seconds:.1f} images/s ({1e3 * seconds:.1f} ms)',
      note=f'compile {compile_s:.1f} s; compiled step memory {used} (arguments + outputs + '
      'temporaries); 500k steps at this rate: '
      f'{500_000 * seconds / 3600:.1f} h')]


# --- 5. memory -------------------------------------------------------------------


def memory_lines() -> list[Line]:
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peak = max((s.get('peak_bytes_in_use', 0) for s in stats), default=0)
  ours = f'{peak / 2**30:.2f} GiB' if peak else 'n/a (the backend reports none)'
  line = Line('peak device memory', 'whole run, busiest device', ours)
  torch = _optional('torch')
  if torch is not None and torch.cuda.is_available():
    line.reference = f'PyTorch {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB'
  return [line]


# --- the run ---------------------------------------------------------------------


def run(plan: Plan, out: str, *, torch: bool = True, label: str = 'full',
        log: Callable[[str], None] = print) -> list[Line]:
  """Every part in turn; rewrites `out` after each. Returns the lines."""
  header = (f'GPU check ({label}), '
            f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}: '
            f'{train_benchmark.describe_device()}')
  if torch and _optional('benchmarks.torch_reference') is None:
    torch = False
    header += '; PyTorch not installed'
  lines: list[Line] = []
  timings = {}

  def part(name, make):
    start = time.perf_counter()
    lines.extend(make())
    timings[name] = time.perf_counter() - start
    text = table(lines, header) + '\nSeconds per part: ' + ', '.join(
        f'{k} {v:.0f}' for k, v in timings.items()) + '\n'
    with open(out, 'w', encoding='utf-8') as f:
      f.write(text)
    log(f'{name}: {timings[name]:.1f} s')

  part('train step', lambda: train_step_lines(plan, torch))
  start = time.perf_counter()
  stored = render(plan, max(plan.protocol_images, plan.kmeans_images))
  timings['render'] = time.perf_counter() - start
  part('K-Means', lambda: kmeans_lines(plan, stored['image'][:plan.kmeans_images]))
  protocol_split = {k: v[:plan.protocol_images] for k, v in stored.items()}
  part('protocol', lambda: protocol_lines(plan, protocol_split))
  # The full protocol: every default segmenter (target: under 60 s on one H100).
  part('full protocol', lambda: protocol_lines(
      plan, protocol_split, defaults.base_config().eval.segmenter_names, 'full protocol'))
  part('Slot Attention', lambda: slot_attention_lines(plan))
  part('memory', memory_lines)
  return lines


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  torch = not _SKIP_TORCH.value
  if torch:
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # shared with PyTorch
    if jax.devices()[0].platform == 'cpu':
      os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  plan = Plan.reduced() if _REDUCED.value else Plan()
  overrides = {}
  if _PROTOCOL_IMAGES.value:
    overrides['protocol_images'] = _PROTOCOL_IMAGES.value
  if _TRAIN_BATCH.value:
    overrides['per_device_batch'] = _TRAIN_BATCH.value
  plan = dataclasses.replace(plan, **overrides)
  run(plan, _OUT.value, torch=torch, label='reduced' if _REDUCED.value else 'full')
  with open(_OUT.value, encoding='utf-8') as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main)
