"""Orbax checkpoints of the global, replicated train state.

The state is saved without any device axis, and restored onto the current
mesh's replicated sharding, so a run saved on 4 devices resumes on 1 or 2.
Saves are asynchronous; `close` waits for the last one.

A checkpoint that no longer restores (a truncated file, a deleted
`_METADATA`: a full disk or a copy cut short) does not block the run: the
newest one that restores is used, with a warning that names the damaged ones.
"""

from __future__ import annotations

import os
import shutil

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from clevr_jax import sharding
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


def _restore_step(manager: ocp.CheckpointManager, abstract, step: int) -> state_lib.TrainState:
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _reason(error: Exception) -> str:
  """The first line of an orbax/tensorstore error (they run to hundreds of lines)."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def restore_newest(manager: ocp.CheckpointManager, like: state_lib.TrainState,
                   mesh: jax.sharding.Mesh) -> tuple[state_lib.TrainState, list[int]]:
  """The newest checkpoint that restores, and the (newer) steps that did not.

  Raises FileNotFoundError when there is no checkpoint and ValueError when none
  restores.
  """
  all_steps = sorted(manager.all_steps(), reverse=True)
  if not all_steps:
    raise FileNotFoundError(
        f"no checkpoint in {manager.directory}: train first "
        "(`python -m clevr_jax.main --mode=train --config=... --workdir=...`)")
  abstract = _abstract(like, mesh)
  damaged: list[tuple[int, str]] = []
  for step in all_steps:
    try:
      state = _restore_step(manager, abstract, step)
    except Exception as e:  # pylint: disable=broad-except  (any damage: fall back)
      damaged.append((step, _reason(e)))
      logging.warning("checkpoint %s does not restore (%s); trying an older one",
                      os.path.join(str(manager.directory), str(step)), damaged[-1][1])
      continue
    if damaged:
      logging.warning("restored the checkpoint of step %d; damaged, not used: %s",
                      step, ", ".join(os.path.join(str(manager.directory), str(s))
                                      for s, _ in damaged))
    return state, [s for s, _ in damaged]
  details = "; ".join(f"step {s}: {reason}" for s, reason in damaged)
  raise ValueError(
      f"no checkpoint in {manager.directory} restores ({details}). Delete that "
      "folder to train from scratch, or use another --workdir.")


def restore(manager: ocp.CheckpointManager, like: state_lib.TrainState,
            mesh: jax.sharding.Mesh, step: int | None = None) -> state_lib.TrainState:
  """The newest restorable (or the given) checkpoint, replicated over `mesh`, shaped like `like`."""
  if step is None:
    return restore_newest(manager, like, mesh)[0]
  try:
    return _restore_step(manager, _abstract(like, mesh), step)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"the checkpoint {os.path.join(str(manager.directory), str(step))} "
                     f"does not restore ({_reason(e)})") from e


def set_aside(manager: ocp.CheckpointManager, damaged: list[int]) -> None:
  """Moves damaged checkpoints out of the manager's folder (to `damaged_checkpoints/`
  beside it), so that training can save those steps again; keeps them for inspection."""
  if not damaged:
    return
  directory = str(manager.directory)
  aside = os.path.join(os.path.dirname(directory), "damaged_checkpoints")
  os.makedirs(aside, exist_ok=True)
  for step in damaged:
    target = os.path.join(aside, str(step))
    if os.path.exists(target):
      shutil.rmtree(target)
    shutil.move(os.path.join(directory, str(step)), target)
    logging.warning("moved the damaged checkpoint of step %d to %s", step, target)
  manager.reload()


def _abstract(like: state_lib.TrainState, mesh: jax.sharding.Mesh):
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      like)
