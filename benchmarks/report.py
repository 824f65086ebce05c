"""Writes a benchmark's table into benchmarks/README.md between its own markers."""

import os
import re

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")


def write_section(name: str, text: str) -> None:
  """Replaces (or appends) the block between `<!-- name:begin -->` and `<!-- name:end -->`."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  block = f"{begin}\n{text}\n{end}"
  content = open(README).read() if os.path.exists(README) else "# Benchmarks\n"
  pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
  content = pattern.sub(lambda _: block, content) if pattern.search(content) else (
      content.rstrip("\n") + "\n\n" + block + "\n")
  tmp = README + ".tmp"
  with open(tmp, "w") as f:
    f.write(content)
  os.replace(tmp, README)


def publish(name: str, lines: list[str], write: bool = True) -> None:
  """Prints a benchmark's table and, if `write`, puts it into README.md as section `name`."""
  text = "\n".join(lines)
  print(text)
  if write:
    write_section(name, text)
