"""Data-parallel train steps, or a restore, on however many devices this process has.

  python tests/helpers/data_parallel.py --config=configs/unet_gray.py:test \
      --config.data.data_dir=DIR --steps=3 --out=state.npz [--save_checkpoint=DIR]
  python tests/helpers/data_parallel.py --config=... --restore=DIR --out=state.npz

Run it with XLA_FLAGS=--xla_force_host_platform_device_count=N for N devices.

Steps: initialises the state from the config's seed, replicates it over a mesh
of all devices and runs `--steps` train steps on one fixed global batch (the
first of the training split's epoch 0, as the real pipeline sends it, split
over the devices by `batch.to_global`), then optionally saves the state with
`checkpoints.save`.
Restore: `checkpoints.restore` of the newest checkpoint in `--restore` onto
this process's mesh, as `train.py` resumes.

Writes to `--out` every leaf of the state (keys from `jax.tree_util.keystr`),
`metrics/loss` and `metrics/grad_norm` per step, `device_count`, and
`replicated`: whether every leaf is a global array replicated over all devices.

--float64: the comparison mode (jax_enable_x64). The network computes in
float64 on a float64 copy of the initial state and batch, so two device counts
differ only by float64 rounding. Only what the code pins to float32 stays so:
the network's output is rounded to float32 and the losses are computed in
float32; their gradient reaches the network elementwise (the same on any device
count), so the state stays float64-exact. No checkpoint in this mode.

Comparing runs on different device counts: use Adam's eps=1 (a flag override).
With eps=1e-8 Adam's first update is about lr * g/|g| per parameter, so float
noise in near-zero gradients (sums in another order) flips whole updates; with
eps=1 the updates are nearly proportional to the gradients.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:preset]")
_OUT = flags.DEFINE_string("out", None, "The .npz to write.")
_STEPS = flags.DEFINE_integer("steps", 0, "Train steps on the fixed batch.")
_SAVE = flags.DEFINE_string("save_checkpoint", None, "Save the final state in DIR/checkpoints.")
_RESTORE = flags.DEFINE_string("restore", None, "Restore the newest checkpoint of DIR.")
_FLOAT64 = flags.DEFINE_bool("float64", False, "Run the steps in float64 (see above).")


def main(argv) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if _FLOAT64.value:
    jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def to_float64(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  from clevr_jax.training import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from clevr_jax import models  # pylint: disable=g-import-not-at-top
  from clevr_jax import sharding  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import train_step  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  mesh = sharding.make_mesh()
  model = models.make_model(config, axis_name=sharding.AXIS)
  if _FLOAT64.value:
    model = model.clone(dtype=jnp.float64)  # compute dtype; params are cast below
  tx = train_step.make_optimizer(config, max(_STEPS.value, 1))
  if _RESTORE.value:
    with checkpoints.make_manager(_RESTORE.value, read_only=True) as manager:
      state = checkpoints.restore(manager, state_lib.abstract_state(config, tx), mesh)
  else:
    state = state_lib.create_state(config, tx)
    if _FLOAT64.value:
      params = to_float64(state.params)
      state = state.replace(params=params, batch_stats=to_float64(state.batch_stats),
                            opt_state=tx.init(params))
    state = sharding.replicate(state, mesh)

  losses, grad_norms = [], []
  if _STEPS.value:
    from clevr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    host_batch = next(pipeline.Split(config, "train").train_batches(
        0, fields=batch_lib.fields(config, "train")))
    batch = sharding.to_global(host_batch, mesh)  # uint8: derived on the device
    step = train_step.make_train_step(config, model, tx, mesh)
    for _ in range(_STEPS.value):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
  if _SAVE.value:
    if _FLOAT64.value:
      raise ValueError("--save_checkpoint is for float32 runs")
    manager = checkpoints.make_manager(_SAVE.value, config)
    checkpoints.save(manager, state)
    checkpoints.close(manager)  # waits for the save

  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  replicated = all(x.sharding.is_fully_replicated
                   and len(x.sharding.device_set) == jax.device_count() for _, x in leaves)
  arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}
  np.savez(_OUT.value, **arrays, **{
      "metrics/loss": np.asarray(losses, np.float64),
      "metrics/grad_norm": np.asarray(grad_norms, np.float64),
      "device_count": np.asarray(jax.device_count()),
      "replicated": np.asarray(replicated)})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
