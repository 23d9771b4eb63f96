"""Traced steps kept between runs, beside JAX's persistent compilation cache.

JAX's compilation cache is keyed by the lowered program, so even when it holds
the compiled train step, every run first traces and lowers the step again: about
3 s of the quick preset's start-up on a CPU (docs/benchmarks.md). Here the first
run exports the lowered step with `jax.export` and writes it; a later run whose
key matches (same config, same clevr_jax sources, same library versions, same
devices, same argument shapes, dtypes and shardings) reads it back in about
0.03 s, and the compilation cache then finds its program. Both runs call the
exported program, so they compute the same thing (tested against the plain
jitted step, bit for bit).

Anything unusual falls back to tracing: several processes (jax.export is used
in one process only), no compilation cache, and, with a warning, a file that
does not deserialize or a step that jax.export cannot serialise (host
callbacks, for one).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
SUBDIR = "clevr_jax_steps"  # inside the compilation cache directory


def directory(cache_dir: str | None = None) -> str | None:
  """Where exported steps live, or None when they are not kept: JAX's
  compilation cache (`cache_dir`, default: JAX's setting) is off or is not a
  local directory, or the run has several processes."""
  cache = jax.config.jax_compilation_cache_dir if cache_dir is None else cache_dir
  if not cache or "://" in cache or jax.process_count() > 1:
    return None
  return os.path.join(cache, SUBDIR)


@functools.cache
def source_digest() -> str:
  """SHA-256 of every clevr_jax source file: any edit gives new keys."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(_PACKAGE_DIR):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, _PACKAGE_DIR).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _versions() -> dict[str, str]:
  versions = {}
  for name in _LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "?"
  return versions


def _leaf_signature(x: Any) -> list[str]:
  sharding = getattr(x, "sharding", None)
  return [str(x.shape), str(x.dtype), repr(sharding) if sharding is not None else ""]


def key(name: str, config: ml_collections.ConfigDict, args: tuple[Any, ...]) -> str:
  """The file name under which the step `name`, traced for `args`, is kept."""
  leaves, treedef = jax.tree.flatten(args)
  devices = jax.devices()
  described = {
      "step": name, "config": config.to_json(sort_keys=True), "sources": source_digest(),
      "versions": _versions(), "platform": devices[0].platform,
      "devices": [f"{d.id}:{d.device_kind}" for d in devices],
      "treedef": str(treedef), "leaves": [_leaf_signature(x) for x in leaves]}
  digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
  return f"{name}-{digest[:32]}.jaxexport"


def cached(jitted: Callable[..., Any], name: str, config: ml_collections.ConfigDict,
           donate_argnums: tuple[int, ...] = (), folder: str | None = None
           ) -> Callable[..., Any]:
  """`jitted`, but traced at most once per key across runs (see the module doc).

  For steps that return `(new_state, metrics)`: a new state with the structure
  of the first argument and a flat dict of arrays (the train step's contract;
  only the dict's names are stored, no pytree definitions). Each distinct
  argument structure and shape is resolved once per process: read from the
  directory (`folder`, default `directory()`), or traced, exported and written
  there.
  """
  resolved: dict[Any, Callable[..., Any]] = {}

  def call(*args):
    leaves, treedef = jax.tree.flatten(args)  # once per step: the resolved step takes both
    signature = (treedef, tuple((x.shape, x.dtype) for x in leaves))
    if signature not in resolved:
      resolved[signature] = _resolve(jitted, name, config, args, leaves, treedef,
                                     donate_argnums, folder or directory())
    return resolved[signature](args, leaves)

  return call


def _resolve(jitted, name, config, args, leaves, treedef, donate_argnums, folder):
  """step(args, leaves): the exported program, or `jitted` when none is kept."""
  if folder is None:
    return lambda args, leaves: jitted(*args)
  # Flat leaves in, flat leaves out: the exported program then needs no pytree
  # registrations (TrainState, optax's states) to be serialised.
  counts = [child.num_leaves for child in treedef.children()]
  starts = [sum(counts[:a]) for a in range(len(args))]
  donated = tuple(i for a in donate_argnums for i in range(starts[a], starts[a] + counts[a]))
  state_treedef = treedef.children()[0]
  n = state_treedef.num_leaves
  path = os.path.join(folder, key(name, config, args))
  exported, names = _read(path)
  if exported is None:
    out_structure = []

    def flat(*flat_leaves):
      out = jitted(*jax.tree.unflatten(treedef, flat_leaves))
      out_structure.append(jax.tree.structure(out))
      return jax.tree.leaves(out)

    try:
      exported = jax.export.export(jax.jit(flat, donate_argnums=donated))(*leaves)
    except Exception as e:  # pylint: disable=broad-except  (e.g. host callbacks)
      logging.warning("Could not export the step %s (%s): it is traced in every run",
                      name, e)
      return lambda args, leaves: jitted(*args)
    names = _metric_names(out_structure[0], state_treedef)
    if names is None:  # not (state, {name: array}): nothing to keep
      return lambda args, leaves: jitted(*args)
    _write(path, exported, names)
  run = jax.jit(exported.call, donate_argnums=donated)

  def step(args, leaves):
    del args  # the leaves are the program's arguments
    out = run(*leaves)
    return jax.tree.unflatten(state_treedef, out[:n]), dict(zip(names, out[n:]))
  return step


def _metric_names(out_treedef, state_treedef) -> list[str] | None:
  """The metrics' names when the step returned (state, {name: array}), else None."""
  placeholder = jax.tree.unflatten(out_treedef, range(out_treedef.num_leaves))
  if not (isinstance(placeholder, tuple) and len(placeholder) == 2
          and isinstance(placeholder[1], dict)
          and jax.tree.structure(placeholder[0]) == state_treedef
          and all(isinstance(v, int) for v in placeholder[1].values())):
    return None
  return list(placeholder[1])  # flatten's order: sorted names


def _read(path: str) -> tuple[jax.export.Exported | None, list[str]]:
  if not os.path.exists(path):
    return None, []
  try:
    with open(path, "rb") as f:
      names = json.loads(f.readline())
      return jax.export.deserialize(bytearray(f.read())), names
  except Exception as e:  # pylint: disable=broad-except  (any damage: trace again)
    logging.warning("Could not read the exported step %s (%s): tracing it again", path, e)
    return None, []


def _write(path: str, exported: jax.export.Exported, names: list[str]) -> None:
  """One file: the metrics' names (a JSON line), then the serialised program."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
      f.write(json.dumps(names).encode() + b"\n")
      f.write(exported.serialize())
    os.replace(temporary, path)  # whole or absent, also for a concurrent run
  except OSError as e:
    logging.warning("Could not keep the exported step in %s (%s)", path, e)
