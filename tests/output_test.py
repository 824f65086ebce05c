"""conftest.assert_output, which the failure tests lean on: it refuses what they must refuse."""

import subprocess

import pytest

from conftest import LOG_LINES, Repeated, assert_output


def _result(stdout: str, stderr: str = "") -> subprocess.CompletedProcess:
  return subprocess.CompletedProcess([], 0, stdout, stderr)


def test_each_line_in_its_place_and_repeated_lines_in_theirs():
  log = "I1205 00:08:38.949271 139968221526912 pipeline.py:28] Preparing data..."
  assert_output(_result("a\nb 1\nb 2\nc\n", f"{log}\n{log}\nerror: x\n"),
                ["a", Repeated(r"b \d"), "c"], [LOG_LINES, "error: x"])
  assert_output(_result("a\nc\n"), ["a", Repeated(r"b \d"), "c"])  # none is a number too


@pytest.mark.parametrize("stdout,stderr", [
    ("a\nc\nextra\n", ""),  # a line too many
    ("a\n", ""),  # one missing
    ("a\nb x\nc\n", ""),  # a repeated line that does not match
    ("a\nc\n", "error: x\nTraceback (most recent call last):\n"),  # anything after our line
    ("a\nc\n", "Exception ignored in: <coroutine>\nerror: x\n"),  # anything before it
])
def test_anything_else_fails(stdout, stderr):
  with pytest.raises(AssertionError):
    assert_output(_result(stdout, stderr), ["a", Repeated(r"b \d"), "c"], [LOG_LINES, "error: x"])
