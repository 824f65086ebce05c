"""`mixtral-plot WORKDIR [--out DIR]`: PNGs of a run's metrics.jsonl, a sweep trial's too
(mixtral_jax/training/plot.py)."""

import argparse
import sys
from typing import Optional

from mixtral_jax.cli import common
from mixtral_jax.training import plot


@common.one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
  """Writes the plots; returns the exit code."""
  parser = argparse.ArgumentParser(prog="mixtral-plot", description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="a training (or sweep trial) workdir")
  parser.add_argument("--out", help="directory for the PNGs (default: the workdir)")
  args = parser.parse_args(argv)
  for path in plot.write(args.workdir, args.out):
    print(path)
  return 0


def run() -> None:
  """Console-script entry point (`mixtral-plot`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
