"""`train.train_and_evaluate` in its own process, optionally killed after its first save.

  python tests/helpers/train_run.py --config=configs/unet_rgb.py:test \
      --config.data.data_dir=DIR --workdir=WORKDIR [--kill_after_first_save]

The tests' stand-in for `python -m clevr_jax.main --mode=train`, without the
evaluation that follows training there (it validates the config as main does). Exceptions propagate (a traceback and
exit status 1), so a test can read the error that training raised.

--kill_after_first_save  SIGKILL this process as soon as its first checkpoint
    is committed (no cleanup, no `finally`): the state a crash or a pre-empted
    machine leaves behind. A fixed point rather than a timer, so the test
    knows which checkpoint the next run resumes from.
"""

from __future__ import annotations

import os
import signal

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:preset]")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory.")
_KILL = flags.DEFINE_bool("kill_after_first_save", False,
                          "SIGKILL this process once its first checkpoint is committed.")


def main(argv) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import train  # pylint: disable=g-import-not-at-top
  from clevr_jax import validate  # pylint: disable=g-import-not-at-top

  validate.check_config(_CONFIG.value, "train", (jax.process_count(), jax.local_device_count()))

  if _KILL.value:
    save = checkpoints.save

    def save_then_die(manager, state, **kwargs):
      save(manager, state, **kwargs)
      manager.wait_until_finished()
      os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.save = save_then_die
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
