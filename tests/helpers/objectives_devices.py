"""Child of tests/test_objectives.py: every objective term and its gradient on
the devices of this process (shard_map, pmean as the train step does) against
the same batch on no axis, in float64. Prints the largest differences and
exits 1 when one exceeds the tolerance."""

import functools
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from objectives_case import make_case  # pylint: disable=g-import-not-at-top

from clevr_jax import objectives  # pylint: disable=g-import-not-at-top

# threefry (JAX's default): the same draws on any device split ('rbg' is
# faster to compile, but its draws under shard_map need not match).
_key = jax.random.key

# float64: the device split only changes summation order, ~1e-16 relative.
TOL = 1e-9


def main() -> int:
  devices = jax.device_count()
  config, projection, features, batch = make_case(batch_size=2 * devices, impl="threefry2x32")

  def loss_fn(proj, feats, batch, axis_name):
    outs = {v: {"embedding": f @ proj} for v, f in feats.items()}
    terms = objectives.objective_terms(config, outs, batch, axis_name,
                                       _key(1))
    if axis_name is not None:
      terms = jax.tree.map(lambda t: jax.lax.pmean(t, axis_name), terms)
    return terms["total"], terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (whole, whole_terms), whole_grad = jax.jit(functools.partial(grad_fn, axis_name=None))(
      projection, features, batch)
  mesh = jax.make_mesh((devices,), ("batch",))
  sharded = jax.jit(jax.shard_map(functools.partial(grad_fn, axis_name="batch"), mesh=mesh,
                                  in_specs=(P(), P("batch"), P("batch")),
                                  out_specs=((P(), P()), P())))
  split_batch = jax.device_put((features, batch), NamedSharding(mesh, P("batch")))
  (split, split_terms), split_grad = sharded(projection, *split_batch)
  worst = 0.0
  for name in whole_terms:
    diff = abs(float(whole_terms[name]) - float(split_terms[name]))
    print(f"{name}: 1 device {float(whole_terms[name]):.12f}, {devices} devices "
          f"{float(split_terms[name]):.12f}, diff {diff:.2e}")
    worst = max(worst, diff / max(abs(float(whole_terms[name])), 1.0))
  grad_diff = float(np.max(np.abs(np.asarray(whole_grad) - np.asarray(split_grad))))
  grad_scale = float(np.max(np.abs(np.asarray(whole_grad))))
  print(f"gradient: max |diff| {grad_diff:.2e}, max |grad| {grad_scale:.2e}")
  worst = max(worst, grad_diff / max(grad_scale, 1.0))
  print(f"devices={devices} worst={worst:.2e}")
  return int(not (worst < TOL and grad_scale > 0))


if __name__ == "__main__":
  sys.exit(main())
