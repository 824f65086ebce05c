"""File utilities: writes that readers never see half-done, and a lock on a directory."""

import fcntl
import os
import tempfile
from mixtral_jax.errors import UserError


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_atomically(path: str, contents: bytes) -> None:
  """Writes via a temp file in the same directory, renamed into place once complete.

  The file gets the mode `open` would give it (0644 under the usual umask), not mkstemp's
  0600: workdirs and data_dir caches are shared by a group.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".partial")
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "wb") as f:
      f.write(contents)
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise


class DirectoryError(UserError, ValueError):
  """A directory cannot be used; the message names it and why."""


def make_directory(path: str, what: str) -> None:
  """Creates `path` (or checks the one there) as a writable directory; `what` names it (a flag)
  in the one-line DirectoryError otherwise."""
  if not path:
    raise DirectoryError(f"{what} is empty; name a directory")
  if os.path.exists(path) and not os.path.isdir(path):
    raise DirectoryError(f"{what}={path} is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise DirectoryError(f"{what}={path}: cannot create it ({e.strerror})") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise DirectoryError(f"{what}={path} is not writable")


class LockedError(UserError, RuntimeError):
  """Another live process holds the lock; the message names the directory and its pid."""


class DirectoryLock:
  """An exclusive lock on a directory: `flock` on DIR/NAME (".lock"), which holds the owner's pid.

  The kernel drops the lock when its process exits, however it exits, so a dead run's lock
  file never blocks the next run. Locks taken through separate DirectoryLock objects exclude
  each other within one process too. Local file systems only: NFS may not honour `flock`.
  """

  def __init__(self, directory: str, name: str = ".lock"):
    self.path = os.path.join(directory, name)
    self._file = None

  def acquire(self, wait: bool = False) -> None:
    """Takes the lock; if a live process holds it, waits for it (`wait`) or raises LockedError."""
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      f.seek(0)
      owner = f.read().strip() or "unknown"
      f.close()
      raise LockedError(f"{os.path.dirname(self.path)} is in use by another run (pid {owner}); "
                        f"wait for it to end or choose another workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    self._file = f

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing the file drops the flock
      self._file = None

  def __enter__(self) -> "DirectoryLock":
    self.acquire(wait=True)
    return self

  def __exit__(self, *exc) -> None:
    self.release()
