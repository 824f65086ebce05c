"""files.write_atomically: the old contents or the new, never part of either."""

import os

import pytest

from mixtral_jax.runtime.files import write_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  write_atomically(str(path), b"old")

  def fail(*args):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    write_atomically(str(path), b"new")
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["config.json"]


def test_files_get_the_mode_the_umask_gives(tmp_path):
  old = os.umask(0o027)
  try:
    write_atomically(str(tmp_path / "a"), b"x")
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o640


def test_writes_create_missing_directories(tmp_path):
  path = tmp_path / "a" / "b" / "stats.json"
  write_atomically(str(path), b"{}")
  assert path.read_bytes() == b"{}"
