"""Orbax checkpoints of the global, replicated train state.

The state is saved without any device axis, and restored onto the current
mesh's replicated sharding, so a run saved on 4 devices resumes on 1 or 2.
Saves are asynchronous; `close` waits for the last one.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from clevr_jax import state as state_lib


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir,
                      "checkpoints")


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None,
                 *, read_only: bool = False) -> ocp.CheckpointManager:
  keep = config.keep_checkpoints if config is not None else None
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: state_lib.TrainState, *,
         force: bool = False) -> None:
  manager.save(int(state.step), args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, like: state_lib.TrainState,
            mesh: jax.sharding.Mesh, step: int | None = None) -> state_lib.TrainState:
  """The newest (or given) checkpoint, replicated over `mesh`, shaped like `like`."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"no checkpoint in {manager.directory}: train first "
        "(`python -m clevr_jax.main --mode=train --config=... --workdir=...`)")
  sharding = state_lib.replicated(mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))
