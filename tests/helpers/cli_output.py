"""What the tests read from a CLI child's output."""


def error_line(result) -> str:
  """The one `error:` line of a CLI run that stopped on bad input (exit status 2)."""
  assert "Traceback" not in result.stderr, result.stderr[-5000:]
  assert result.returncode == 2, result.stderr[-5000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr[-5000:]
  return lines[0]
