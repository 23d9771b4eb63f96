"""Starting a module's child processes with its first test, so that they overlap the others."""


def selected_in_module(request, fixture: str) -> bool:
  """Whether a selected test of the requesting module uses `fixture` (the
  children it starts are then worth starting early; otherwise not at all)."""
  return any(fixture in item.fixturenames and item.module is request.module
             for item in request.session.items)
