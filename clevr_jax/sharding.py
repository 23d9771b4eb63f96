"""The device boundary: the mesh, its axis, and arrays between hosts and devices.

The mesh has one axis, `AXIS`, over all devices of all processes. The train
state is replicated over it; batches are split along their first axis over it.
Each process holds a flat slice of a global batch ([per-process batch, ...],
process p's examples after those of processes 0..p-1): `to_global` makes the
global arrays from it, `local_rows` gives a process its slice back,
`gather_rows` joins the processes' slices on every host and `to_host` gathers
a whole global array onto every host.

Training, evaluation and the benchmarks all cross the boundary here.

No TensorFlow here.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

AXIS = "batch"  # the data-parallel mesh axis


def join_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, auto_detect: bool = False
                   ) -> tuple[int, int]:
  """Joins a multi-process run: explicitly (all three given), auto-detected
  (Cloud TPU VMs, SLURM) with `auto_detect`, or not at all (one process).

  Returns (processes, this process's devices). Processes other than 0 log
  warnings only, so that a run's log is written once.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif auto_detect:
    jax.distributed.initialize()
  try:  # the backend starts here: JAX_PLATFORMS may name one this machine lacks
    jax.devices()
  except RuntimeError as e:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    advice = (f"JAX_PLATFORMS={platforms!r} names none this machine has: unset it, or set "
              "JAX_PLATFORMS=cpu" if platforms else
              "check JAX's installation for this accelerator, or run on the CPU with "
              "JAX_PLATFORMS=cpu")
    raise ValueError(f"JAX cannot start a backend ({str(e).split(' (set JAX_PLATFORMS')[0]}): "
                     + advice) from None
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info("JAX %s: %d process(es), %d device(s) (%s)", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  return jax.process_count(), jax.local_device_count()


def make_mesh() -> jax.sharding.Mesh:
  """One axis, `AXIS`, over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host (or device) values -> global arrays replicated on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Split along the first axis over `AXIS`."""
  return NamedSharding(mesh, P(AXIS))


def to_global(host_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh
              ) -> dict[str, jax.Array]:
  """Each process's flat slice [per-process batch, ...] -> global arrays split over AXIS."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in host_batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A global array, gathered whole onto every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array split over AXIS, in order (`to_global`'s input)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows (the same count each), in process order: the global batch."""
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))
