"""`python -m clevr_jax.main` with a Ctrl-C at a fixed point of training.

  CLEVR_JAX_TEST_INTERRUPT_AT_STEP=N python tests/helpers/interrupted_main.py [main's flags]

SIGINT reaches this process while step N's metrics are being logged: after
the step ran, before its record is written. That is where a Ctrl-C pressed
during a step's device work lands (Python sees signals between its own lines,
and the step's results are fetched there). A fixed point rather than a timer,
so the test knows which step the run stops at.
"""

from __future__ import annotations

import os
import signal

from absl import app

from clevr_jax import logs
from clevr_jax import main

_STEP = int(os.environ["CLEVR_JAX_TEST_INTERRUPT_AT_STEP"])
_update = logs.Throughput.update


def _update_then_interrupt(self, step: int):
  if step == _STEP:
    os.kill(os.getpid(), signal.SIGINT)
  return _update(self, step)


if __name__ == "__main__":
  logs.Throughput.update = _update_then_interrupt
  app.run(main.main, flags_parser=main.parse_flags)
