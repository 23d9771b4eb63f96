"""bfloat16 compute trains like float32: parameters and optimizer stay float32."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from clevr_jax import evaluation
from clevr_jax import steps
from clevr_jax import train


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def test_bfloat16_run_trains_and_ends_within_ten_percent_of_float32(tmp_path, test_config):
  final = {}
  for dtype in ("float32", "bfloat16"):
    config = test_config("unet_rgb")
    config.model.dtype = dtype
    # Past the steep start of the curve (8 steps are not), where two runs that
    # differ by rounding alone land at comparable losses.
    config.num_epochs = 6
    config.checkpoint_every_steps = 1000
    workdir = str(tmp_path / dtype)
    final[dtype] = train.train_and_evaluate(config, workdir)["test/loss"]
    losses = _train_losses(workdir)
    assert losses[-1] < 0.5 * losses[0], dtype  # it trains

  assert abs(final["bfloat16"] - final["float32"]) <= 0.1 * final["float32"], final
  state, _ = evaluation.restore_state(config, workdir, steps.make_mesh())
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {np.dtype(np.float32)}
