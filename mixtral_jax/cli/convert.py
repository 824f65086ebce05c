"""`mixtral-convert`: checkpoints to and from HF transformers (mixtral_jax/tools/convert.py).

    mixtral-convert to-hf --workdir WORKDIR [--step N] --out DIR
    mixtral-convert from-hf --hf DIR --workdir WORKDIR [--config=configs/default.py]
    mixtral-convert from-hf --hf DENSE_DIR --workdir WORKDIR --upcycle --num_experts 8 \
        --experts_per_token 2 [--upcycle_method copy|split] [--upcycle_noise 0.01]
    mixtral-convert upcycle --dense DENSE_WORKDIR [--step N] --workdir WORKDIR --num_experts 8 \
        --experts_per_token 2 [...]

`--upcycle` reads a dense Mistral or Llama (tools/upcycle.py says how its MLP becomes experts);
`upcycle` does the same from one of our runs trained with --config.model.num_experts=1.
"""

import argparse
import os
import sys
from typing import Optional

import ml_collections

from mixtral_jax.cli import common
from mixtral_jax.runtime import platforms
from mixtral_jax.runtime.workdir import WorkDir
from mixtral_jax.tools import convert
from mixtral_jax.tools import upcycle as upcycle_lib
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
  from_hf.add_argument("--upcycle", action="store_true",
                       help="the HF model is a dense Mistral/Llama: make its MLPs experts")
  upcycle = commands.add_parser("upcycle", help="our dense run (num_experts=1) → an MoE's step 0")
  upcycle.add_argument("--dense", required=True, help="workdir of the dense run")
  upcycle.add_argument("--step", type=int, default=None, help="default: its latest checkpoint")
  upcycle.add_argument("--workdir", required=True)
  for command in (from_hf, upcycle):
    command.add_argument("--num_experts", type=int, default=8)
    command.add_argument("--experts_per_token", type=int, default=2)
    command.add_argument("--upcycle_method", default="copy", choices=upcycle_lib.METHODS,
                         help="copy: every expert the dense MLP; split: slices of its width")
    command.add_argument("--upcycle_noise", type=float, default=0.0,
                         help="relative std of noise on each expert's copy")
    command.add_argument("--upcycle_seed", type=int, default=0)
  args = parser.parse_args(argv)
  platforms.use_present_platforms()
  if args.command == "to-hf":
    params, config = build_lib.restore_params(args.workdir, args.step)
    tokenizer = WorkDir(args.workdir).tokenizer
    if not os.path.exists(tokenizer):
      print(f"warning: no {tokenizer}; exporting without a tokenizer", file=sys.stderr)
      tokenizer = None
    convert.export_hf(params, config.model, args.out, args.max_shard_bytes, tokenizer)
    print(f"wrote {args.out}")
  else:
    config = _write_step0(args)
    flags = " ".join(f"--config.model.{k}={config.model[k]}" for k in sorted(config.model))
    if config.data.tokenizer_path:
      flags += f" --config.data.tokenizer_path={config.data.tokenizer_path}"
    print(f"wrote step 0 of {args.workdir}; train it with: mixtral-train "
          f"--workdir={args.workdir} {flags}")
  return 0


def _write_step0(args) -> ml_collections.ConfigDict:
  """Writes step 0 of args.workdir as from-hf or upcycle says; returns the training config."""
  if args.command == "from-hf" and not args.upcycle:
    return convert.import_hf(args.hf, args.workdir, common.load_config(args.config))
  upcycling = upcycle_lib.Upcycling(args.num_experts, args.experts_per_token,
                                    args.upcycle_method, args.upcycle_noise,
                                    seed=args.upcycle_seed)
  if args.command == "upcycle":
    return upcycle_lib.upcycle_run(args.dense, args.workdir, upcycling, args.step)
  return upcycle_lib.upcycle_hf(args.hf, args.workdir, common.load_config(args.config),
                                upcycling)


def run() -> None:
  """Console-script entry point (`mixtral-convert`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
