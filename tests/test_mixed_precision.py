"""bfloat16 compute trains like float32: parameters and optimizer stay float32."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from clevr_jax import evaluate
from clevr_jax import steps
from clevr_jax import train


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_bfloat16_run_trains_and_ends_within_ten_percent_of_float32(
    tmp_path, trained_workdir, test_config):
  config = test_config("unet_rgb")
  with config.unlocked():
    config.model.dtype = "bfloat16"
  workdir = str(tmp_path / "bf16")
  final = train.train_and_evaluate(config, workdir)

  records = _metrics(workdir)
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert losses[-1] < 0.5 * losses[0]  # it trains
  float32_loss = [r["test/loss"] for r in _metrics(trained_workdir) if "test/loss" in r][-1]
  assert abs(final["test/loss"] - float32_loss) <= 0.1 * float32_loss

  state, _ = evaluate.restore_state(config, workdir, steps.make_mesh())
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {np.dtype(np.float32)}
