"""File utilities: writes that readers never see half-done."""

import os
import tempfile


def write_atomically(path: str, contents: bytes) -> None:
  """Writes via a temp file in the same directory, renamed into place once complete."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".partial")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(contents)
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise
