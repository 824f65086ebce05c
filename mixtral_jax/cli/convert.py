"""`mixtral-convert`: checkpoints to and from HF transformers (mixtral_jax/tools/convert.py).

    mixtral-convert to-hf --workdir WORKDIR [--step N] --out DIR
    mixtral-convert from-hf --hf DIR --workdir WORKDIR [--config=configs/default.py]
"""

import argparse
import os
import sys
from typing import Optional

from mixtral_jax.cli import common
from mixtral_jax.runtime.workdir import WorkDir
from mixtral_jax.tools import convert
from mixtral_jax.training import build as build_lib


@common.one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
  """Runs the command in `argv` (default: the command line); returns the exit code."""
  parser = argparse.ArgumentParser(prog="mixtral-convert", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  to_hf = commands.add_parser("to-hf", help="checkpoint → HF transformers Mixtral directory")
  to_hf.add_argument("--workdir", required=True)
  to_hf.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  to_hf.add_argument("--out", required=True)
  to_hf.add_argument("--max_shard_bytes", type=int, default=4 << 30)
  from_hf = commands.add_parser("from-hf", help="HF transformers Mixtral directory → checkpoint")
  from_hf.add_argument("--hf", required=True)
  from_hf.add_argument("--workdir", required=True)
  from_hf.add_argument("--config", default="configs/default.py",
                       help="training config whose non-architecture fields the import keeps")
  args = parser.parse_args(argv)
  if args.command == "to-hf":
    params, config = build_lib.restore_params(args.workdir, args.step)
    tokenizer = WorkDir(args.workdir).tokenizer
    if not os.path.exists(tokenizer):
      print(f"warning: no {tokenizer}; exporting without a tokenizer", file=sys.stderr)
      tokenizer = None
    convert.export_hf(params, config.model, args.out, args.max_shard_bytes, tokenizer)
    print(f"wrote {args.out}")
  else:
    config = convert.import_hf(args.hf, args.workdir, common.load_config(args.config))
    flags = " ".join(f"--config.model.{k}={config.model[k]}" for k in sorted(config.model))
    if config.data.tokenizer_path:
      flags += f" --config.data.tokenizer_path={config.data.tokenizer_path}"
    print(f"wrote step 0 of {args.workdir}; train it with: mixtral-train "
          f"--workdir={args.workdir} {flags}")
  return 0


def run() -> None:
  """Console-script entry point (`mixtral-convert`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
