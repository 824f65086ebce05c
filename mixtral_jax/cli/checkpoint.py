"""`mixtral-checkpoint info [--verify] WORKDIR`: a workdir's complete checkpoints, a line each
(mixtral_jax/training/checkpoint.py). `--verify` reads every array back (into host memory) and
marks the checkpoints that fail; the exit code is then 1 if any did."""

import argparse
import sys
from typing import Optional

from mixtral_jax.cli import common
from mixtral_jax.runtime import platforms
from mixtral_jax.runtime.workdir import WorkDir
from mixtral_jax.training import checkpoint


@common.one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
  """Prints the table; returns the exit code."""
  parser = argparse.ArgumentParser(prog="mixtral-checkpoint", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  info = commands.add_parser("info", help="list the complete checkpoints")
  info.add_argument("--verify", action="store_true", help="read every array back")
  info.add_argument("workdir", help="a training workdir")
  args = parser.parse_args(argv)
  platforms.use_present_platforms()
  records = checkpoint.info(args.workdir, args.verify)
  if not records:
    print(f"no complete checkpoints in {WorkDir(args.workdir).checkpoints}")
  for r in records:
    status = ("" if not args.verify else "  verified" if r["damaged"] is None
              else f"  DAMAGED: {r['damaged']}")
    print(f"step {r['step']:>8}  {r['bytes'] / 1e6:9.2f} MB  next batch {r['data_position']}  "
          f"{r['model']}{status}")
  return 1 if any(r.get("damaged") for r in records) else 0


def run() -> None:
  """Console-script entry point (`mixtral-checkpoint`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
