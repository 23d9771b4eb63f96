"""Orbax checkpoints of the global, replicated train state.

The state is saved without any device axis, and restored onto the current
mesh's replicated sharding, so a run saved on 4 devices resumes on 1 or 2.
Saves are asynchronous; `close` waits for the last one.

A checkpoint that no longer restores (a truncated file, a deleted
`_METADATA`: a full disk or a copy cut short) does not block the run: the
newest one that restores is used, with a warning that names the damaged ones.
A checkpoint whose arrays have other shapes than the config's network is not
damaged: the config does not match it, and `ArchitectureMismatch` says which
parameters differ. A save that fails (a full disk) is one short
`CheckpointWriteError` that says from which step training resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from typing import Any, Coroutine, Iterator

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils as orbax_asyncio

from clevr_jax import models
from clevr_jax import sharding
from clevr_jax.training import state as state_lib


class ArchitectureMismatch(ValueError):
  """The checkpoint holds another network than the config builds (not damage);
  `differences` lists the parameters that differ, for callers that give their own advice."""

  def __init__(self, message: str, differences: str = "") -> None:
    super().__init__(message)
    self.differences = differences


class CheckpointWriteError(ValueError):
  """A checkpoint could not be written (a full disk, a quota, a file size limit)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir,
                      "checkpoints")


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None,
                 *, read_only: bool = False) -> ocp.CheckpointManager:
  keep = config.keep_checkpoints if config is not None else None
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  # The handler named: the manager can then read a checkpoint's metadata (shapes).
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` ('' = none) holds a committed checkpoint."""
  workdir = os.path.expanduser(workdir)
  if not workdir or not os.path.isdir(checkpoint_dir(workdir)):
    return False
  with make_manager(workdir, read_only=True) as manager:
    return manager.latest_step() is not None


def newest_step_on_disk(workdir: str) -> int | None:
  """The newest committed checkpoint's step, read from the folder names alone."""
  try:
    steps = [int(n) for n in os.listdir(checkpoint_dir(workdir)) if n.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


def _write_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointWriteError:
  # TensorStore states the OS error only in its text: [os_error_code='28'].
  code = re.search(r"os_error_code='(\d+)'", str(error))
  reason = os.strerror(int(code.group(1))) if code else _reason(error)
  workdir = os.path.dirname(str(manager.directory))
  step = newest_step_on_disk(workdir)
  return CheckpointWriteError(
      f"cannot write a checkpoint in {manager.directory} ({reason}): free space (or raise "
      "the limit) and run the same command again: training resumes from "
      + (f"step {step}." if step is not None else "step 0 (no checkpoint was written)."))


def save(manager: ocp.CheckpointManager, state: state_lib.TrainState, *,
         force: bool = False) -> None:
  """Starts an asynchronous save (after the previous one is written)."""
  try:
    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=force)
  except Exception as e:  # pylint: disable=broad-except  (orbax/TensorStore raise anything)
    raise _write_error(manager, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the last save to be written."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _write_error(manager, e) from e


def close(manager: ocp.CheckpointManager) -> None:
  """Waits for the last save and stops orbax's threads (their loops, cleanly)."""
  try:
    finish(manager)
  finally:
    manager.close()


# The folder of a step's state inside its checkpoint (the manager's one item).
_ITEM = "default"


def _run_awaiting_every_task(coro: Coroutine[Any, Any, Any]) -> Any:
  """Runs `coro` on a fresh event loop, as orbax does, and before closing the loop
  cancels and awaits every task it still has. orbax reads a checkpoint's arrays as
  concurrent tasks and closes the loop as soon as one read fails (a damaged file):
  the other reads, left suspended on the closed loop, would be collected unawaited
  later, each an error printed by the garbage collector."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    pending = asyncio.all_tasks(loop)
    for task in pending:
      task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    asyncio.set_event_loop(None)
    loop.close()


@contextlib.contextmanager
def _reads_awaited() -> Iterator[None]:
  """orbax's synchronous entry to its event loops (`asyncio_utils`, the one place
  it makes them) uses `_run_awaiting_every_task` while a restore runs."""
  original = orbax_asyncio._run_sync_via_new_loop  # pylint: disable=protected-access
  orbax_asyncio._run_sync_via_new_loop = _run_awaiting_every_task  # pylint: disable=protected-access
  try:
    yield
  finally:
    orbax_asyncio._run_sync_via_new_loop = original  # pylint: disable=protected-access


def _restore_step(manager: ocp.CheckpointManager, abstract, step: int) -> state_lib.TrainState:
  with _reads_awaited():
    return _restore_step_unguarded(manager, abstract, step)


def _restore_step_unguarded(manager: ocp.CheckpointManager, abstract, step: int
                            ) -> state_lib.TrainState:
  if abstract.opt_state is not None:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  # The network's part alone (`state_lib.abstract_state` without an optimizer):
  # a partial restore, which reads no optimizer state.
  tree = {"step": abstract.step, "params": abstract.params,
          "batch_stats": abstract.batch_stats, "rng": abstract.rng}
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(
        os.path.join(str(manager.directory), str(step), _ITEM),
        args=ocp.args.PyTreeRestore(
            item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
            partial_restore=True))
  finally:
    checkpointer.close()
  return state_lib.TrainState(opt_state=None, **restored)


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
    check_architecture(manager, step, like)
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
  check_architecture(manager, step, like)
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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'params/enc1/conv1/kernel' -> shape, for the network's arrays (not the optimizer's)."""
  def name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [name(k) for k in path]
    if names and names[0] in ("params", "batch_stats"):
      shapes["/".join(names)] = tuple(getattr(leaf, "shape", ()))
  return shapes


def check_architecture(manager: ocp.CheckpointManager, step: int,
                       like: state_lib.TrainState) -> None:
  """Raises ArchitectureMismatch when the checkpoint's network differs from `like`'s.

  Reads the checkpoint's metadata only; one whose metadata does not read is left
  to the restore, which reports it as damaged.
  """
  try:
    saved = _shapes(manager.item_metadata(step))
  except Exception:  # pylint: disable=broad-except  (damaged: the restore says so)
    return
  wanted = _shapes(like)
  if not saved or saved == wanted:
    return
  differ = [f"{k} is {saved[k]} there, {wanted[k]} here"
            for k in wanted if k in saved and saved[k] != wanted[k]]
  differ += [f"{k} is missing there" for k in wanted if k not in saved]
  differ += [f"{k} is not in this network" for k in saved if k not in wanted]
  differences = "; ".join(differ[:3]) + (f" (and {len(differ) - 3} more)"
                                          if len(differ) > 3 else "")
  raise ArchitectureMismatch(
      f"the checkpoint of step {step} in {manager.directory} holds another network than "
      f"the config builds: {differences}. The config does not match the checkpoint (it is "
      "not damaged): run with the settings it was trained with (config.model.*, "
      "data.grayscale, task), or use another --workdir.", differences)


def restore_model(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
                  ) -> tuple[state_lib.TrainState, models.UNet]:
  """The network's state (step, parameters, BatchNorm statistics; no optimizer
  state) of the newest checkpoint of `workdir`, replicated over `mesh`, and its model."""
  model = models.make_model(config)
  like = state_lib.abstract_state(config)
  with make_manager(workdir, read_only=True) as manager:
    return restore(manager, like, mesh), model
