"""`python tests/helpers/config_reads.py OUT ARGS...`: runs `clevr_jax.main ARGS`,
then writes to OUT (JSON) every config key the run read, by dotted path.

A read is an attribute or item access on an `ml_collections.ConfigDict` (or its
`get`). Each section a read returns is remembered under its path, so a function
that receives `config.eval` and reads `.taps` records `eval.taps` (sections met
while iterating `items()` are remembered too); a copy of the
whole config (`copy_and_resolve_references`) starts again at the root.
"""

import json
import runpy
import sys

import ml_collections

_PATHS: dict[int, str] = {}
_KEEP: list[ml_collections.ConfigDict] = []  # keeps ids unique for the run
_READ: set[str] = set()


def _checking() -> bool:
  """Whether the validation pass (or ml_collections itself) is reading: it reads
  every key to check it, which is no use of the setting."""
  frame = sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None:
    if frame.f_globals.get("__name__", "") in ("clevr_jax.validate", "clevr_jax.defaults"):
      return True
    frame = frame.f_back
  return False


def _remember(section: ml_collections.ConfigDict, path: str) -> None:
  """A section's path is where it was last reached from: sections met while the
  config is built (before they hang from the root) get their place when read."""
  if id(section) not in _PATHS:
    _KEEP.append(section)
  _PATHS[id(section)] = path


def _recorded(method):
  def read(node, key, *args, **kwargs):
    value = method(node, key, *args, **kwargs)
    caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
    if (isinstance(key, str) and not key.startswith("_")
        and not caller.startswith("ml_collections")  # to_dict, copies: not the run's reads
        and not _checking()):
      base = _PATHS.get(id(node), "")
      path = f"{base}.{key}" if base else key
      _READ.add(path)
      if isinstance(value, ml_collections.ConfigDict):
        _remember(value, path)
    return value
  return read


def _paths_of_children(method):
  def iterate(node, *args, **kwargs):
    if sys._getframe(1).f_globals.get("__name__", "").startswith("ml_collections"):  # pylint: disable=protected-access
      return method(node, *args, **kwargs)
    base = _PATHS.get(id(node), "")
    pairs = method(node, *args, **kwargs)
    for key, value in pairs:
      if isinstance(value, ml_collections.ConfigDict):
        _remember(value, f"{base}.{key}" if base else key)
    return pairs
  return iterate


def main() -> None:
  out, args = sys.argv[1], sys.argv[2:]
  for name in ("__getattr__", "__getitem__", "get"):
    setattr(ml_collections.ConfigDict, name, _recorded(getattr(ml_collections.ConfigDict, name)))
  # Iterating a section reads none of its leaves, but tells where its sections sit.
  ml_collections.ConfigDict.items = _paths_of_children(ml_collections.ConfigDict.items)
  sys.argv = ["clevr_jax.main", *args]
  try:
    runpy.run_module("clevr_jax.main", run_name="__main__", alter_sys=True)
  finally:
    with open(out, "w") as f:
      json.dump(sorted(_READ), f)


if __name__ == "__main__":
  main()
