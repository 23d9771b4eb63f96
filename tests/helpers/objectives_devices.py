"""Child of tests/test_objectives.py, in float64 on the devices of this process:
the real train step (`train_step.make_train_step`, every objective term on,
two views, pseudo-labels in the batch) on a mesh of all devices against a mesh
of one device.

Prints the largest differences and exits 1 when one exceeds its tolerance."""

import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

# float64: the device split only changes summation order, ~1e-16 relative.
TOL = 1e-9


def train_steps_on_devices(num_steps: int = 2) -> float:
  """The worst relative difference of the state and the logged terms after
  `num_steps` real train steps on all devices vs one.

  float64 network and state (as tests/helpers/data_parallel.py --float64): the
  taps and the objective terms are then float64, and the device split changes
  only the order of float64 sums, except the reconstruction term, whose output
  is rounded to float32 and averaged in float32 (bounded separately below).
  Adam's eps = 1: updates proportional to the gradients (see data_parallel.py).
  """
  from benchmarks import samples  # pylint: disable=g-import-not-at-top
  from configs import unet_objects  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from clevr_jax import models  # pylint: disable=g-import-not-at-top
  from clevr_jax import sharding  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import train_step  # pylint: disable=g-import-not-at-top

  devices = jax.device_count()
  config = unet_objects.get_config("test")
  # Small: two compilations of the whole step (one per mesh) in float64.
  config.model.base_width, config.model.depth, config.model.embedding_tap = 4, 2, "dec2"
  config.data.image_height, config.data.image_width = 16, 24
  config.optimizer.eps = 1.0
  obj = config.objectives
  obj.discriminative.weight = 1.0
  obj.mask_infonce.weight = 0.5
  obj.mask_infonce.queries = "pixel"  # the default (view_infonce makes two views)
  obj.view_infonce.weight = 0.25
  obj.view_infonce.num_points = 16
  h, w = config.data.image_height, config.data.image_width
  host_batch = samples.random_stored(config, 2 * devices, batch_lib.fields(config, "train"))
  blocks = np.random.default_rng(1).integers(0, 6, (2 * devices, h // 4, w // 4))
  host_batch["pseudo_labels"] = np.repeat(np.repeat(blocks, 4, 1), 4, 2).astype(np.uint8)

  def run(mesh):
    model = models.make_model(config, axis_name=sharding.AXIS).clone(dtype=jnp.float64)
    tx = train_step.make_optimizer(config, num_steps)
    state = state_lib.create_state(config, tx)
    as64 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float64), t)
    params = as64(state.params)
    state = state.replace(params=params, batch_stats=as64(state.batch_stats),
                          opt_state=tx.init(params))
    state = sharding.replicate(state, mesh)
    step = train_step.make_train_step(config, model, tx, mesh)
    batch = sharding.to_global(host_batch, mesh)
    for _ in range(num_steps):
      state, metrics = step(state, batch)
    return jax.device_get(state), jax.device_get(metrics)

  whole_state, whole_metrics = run(jax.make_mesh((1,), (sharding.AXIS,),
                                                 devices=jax.devices()[:1]))
  split_state, split_metrics = run(sharding.make_mesh())
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(whole_state.params)[0],
                          jax.tree.leaves(split_state.params)):
    diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    worst = max(worst, diff / max(float(np.max(np.abs(np.asarray(a)))), 1.0))
  print(f"train step params: worst relative diff {worst:.2e}")
  # The float32 reconstruction mean of N values in another order: within N * 2^-24
  # of its value (the worst case of float32 sums of non-negative terms).
  n = host_batch["image"].size * 2  # two views
  recon_tol = n * 2.0**-24
  for name in whole_metrics:
    a, b = float(whole_metrics[name]), float(split_metrics[name])
    tol = recon_tol if name in ("loss", "data_loss") else TOL
    print(f"train step {name}: 1 device {a:.12f}, {devices} devices {b:.12f}, "
          f"diff {abs(a - b):.2e} (tolerance {tol:.1e} relative)")
    worst = max(worst, abs(a - b) / max(abs(a), 1.0) * TOL / tol)
  assert {"discriminative", "mask_infonce", "view_infonce"} <= set(whole_metrics)
  return worst


def main() -> int:
  worst = train_steps_on_devices()
  print(f"devices={jax.device_count()} worst={worst:.2e}")
  return int(not worst < TOL)


if __name__ == "__main__":
  sys.exit(main())
