"""`mixtral-compile`: prove a pod-scale run compiles and fits before renting the pod
(mixtral_jax/tools/compile.py).

    mixtral-compile --config=configs/mixtral_8x7b.py --topology=v5p-128 [--config.x=y …]
        [--save DIR]

Exit codes: 0 fits; 3 does not fit (the numbers say by how much); 1 an error in one line (a bad
config, an unknown topology); 2 a bad command line.
"""

import argparse
import json
import os
import sys
from typing import Optional

from mixtral_jax.cli import common


@common.one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
  """Compiles the config's train step for the topology; returns the exit code."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing runs: the host backend will do
  from absl import flags
  from mixtral_jax.runtime import platforms
  from mixtral_jax.tools import compile as compile_lib  # after the environment above
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="mixtral-compile", description=__doc__.splitlines()[0])
  parser.add_argument("--topology", required=True, help=", ".join(compile_lib.TOPOLOGIES))
  parser.add_argument("--save", help="directory for the report as report.json")
  args, config_args = parser.parse_known_args(argv)
  platforms.quiet_compile_only_tpu(args.topology)  # libtpu loads at the first compile
  try:
    config = common.parse_config_args(config_args, "configs/default.py")
  except (flags.Error, KeyError, AttributeError) as e:  # a flag, or a --config.* naming no field
    print(f"error: {str(e).strip().splitlines()[0]} (a --config.* flag names no config field?)"
          if not isinstance(e, flags.Error) else f"error: {e}", file=sys.stderr)
    return 2
  except (OSError, SyntaxError) as e:  # the --config file
    print(f"error: --config: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 1
  result = compile_lib.report(config, args.topology)
  print(compile_lib.format_report(result))
  if args.save:
    os.makedirs(args.save, exist_ok=True)
    with open(os.path.join(args.save, "report.json"), "w") as f:
      json.dump(result, f, indent=2)
  return 0 if result["fits"] else 3


def run() -> None:
  """Console-script entry point (`mixtral-compile`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
