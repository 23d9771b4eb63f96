r"""XLA:CPU compiler options side by side on the real train step, PyTorch beside them.

  python -m clevr_jax.benchmarks.xla_cpu_options [--batch=2]
      [--rounds=5] [--variants=default,xnn_greedy,onednn]

Each variant is the step train.py runs (`train_benchmark.compile_step`: 240x320,
the poster's U-Net, float32, uint8 batch) compiled with its own XLA options in
this one process, and the variants' runs are interleaved round by round with
the PyTorch twin's, so that load from other processes hits all alike (separate
processes with different XLA_FLAGS gave ratios that swung 0.2-0.5 on this
shared host). Prints per variant the median ms/step (min, max), JAX/PyTorch
images/s, compile time and the loss after the timed steps (the options must not
change the results beyond float noise).
"""

from __future__ import annotations

import os
import statistics
from typing import Sequence

from absl import app
from absl import flags

from clevr_jax.benchmarks import train_benchmark as tb

VARIANTS = {
    'default': {},
    # XNNPACK subgraphs (convolutions, dots, elementwise) greedily extracted.
    'xnn_greedy': {'xla_cpu_experimental_xnn_graph_fusion_mode':
                   'XNN_GRAPH_FUSION_MODE_GREEDY'},
    'xnn_greedy_slinky': {'xla_cpu_experimental_xnn_graph_fusion_mode':
                          'XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY'},
    # oneDNN convolutions and matmuls as custom calls (the lead).
    'onednn': {'xla_cpu_experimental_onednn_custom_call': True},
    # YNNPACK convolutions.
    'ynn_conv': {'xla_cpu_experimental_ynn_fusion_type': 'individual_convolution'},
}

_BATCH = flags.DEFINE_integer('batch', 2, 'Images per step (one device).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds of 2 steps each.')
_VARIANTS = flags.DEFINE_list('variants', ['default', 'xnn_greedy', 'onednn'],
                              f'Which of {sorted(VARIANTS)}.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch is imported
  from clevr_jax.benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f'unknown variants {unknown}; choose from {sorted(VARIANTS)}')
  batch = _BATCH.value
  config = tb.bench_config(8, 'float32', 240, 320)
  print(f'{tb.describe_device()}; {torch_reference.describe_device()}; load '
        f'{tb.load_average()}', flush=True)
  runs = {}
  for name in _VARIANTS.value:
    runs[name] = tb.compile_step(config, batch, compiler_options=VARIANTS[name] or None)
    runs[name].run(1)
    print(f'{name}: compiled in {runs[name].compile_s:.0f} s', flush=True)
  runner = torch_reference.make_runner(base_width=8, depth=4, dtype='float32', batch=batch,
                                       height=240, width=320)
  times = {name: [] for name in [*runs, 'torch']}
  for _ in range(_ROUNDS.value):
    for name, compiled in runs.items():
      times[name] += tb.step_seconds(compiled.run, 2, 1)
    times['torch'] += tb.step_seconds(runner.run, 2, 1)
  torch_s = statistics.median(times['torch'])
  print(f'batch {batch}, {_ROUNDS.value} rounds of 2 steps; load {tb.load_average()}; '
        f'PyTorch {1e3 * torch_s:.0f} ms/step (min {1e3 * min(times["torch"]):.0f})')
  print('| variant | ms/step (min-max) | JAX/PyTorch images/s | compile (s) | loss after |')
  print('|---|---|---|---|---|')
  for name, compiled in runs.items():
    seconds = statistics.median(times[name])
    print(f'| {name} | {1e3 * seconds:.0f} ({1e3 * min(times[name]):.0f}-'
          f'{1e3 * max(times[name]):.0f}) | {torch_s / seconds:.2f} | '
          f'{compiled.compile_s:.0f} | {compiled.run(1):.6f} |')


if __name__ == '__main__':
  app.run(main)
