"""`mixtral-sample`: text from a training workdir's checkpoint (mixtral_jax/tools/sample.py).

    mixtral-sample --workdir=/tmp/run --prompt="def fib(" --max_new_tokens=128 \
        --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 [--num_samples=4] [--step=N] \
        [--one_device]
"""

import argparse
import sys
from typing import Optional

import jax
from absl import logging

from mixtral_jax.cli import common
from mixtral_jax.runtime import platforms
from mixtral_jax.data import sources
from mixtral_jax.data import tokenizer as tokenizer_lib
from mixtral_jax.runtime.workdir import WorkDir
from mixtral_jax.tools import sample
from mixtral_jax.training import build as build_lib


@common.one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
  """Console-script entry point (`mixtral-sample`)."""
  parser = argparse.ArgumentParser(prog="mixtral-sample", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a training workdir with a checkpoint")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  parser.add_argument("--prompt_file", help="a file whose whole text is one more prompt")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=40, help="0 = all tokens")
  parser.add_argument("--top_p", type=float, default=0.95)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
  parser.add_argument("--one_device", action="store_true",
                      help="sample on one device instead of the config's mesh")
  args = parser.parse_args(argv)
  platforms.use_present_platforms()
  logging.set_verbosity(logging.ERROR)  # Orbax's notes on a read-only checkpoint manager
  texts = list(args.prompt)
  if args.prompt_file:
    try:
      with open(args.prompt_file) as f:
        texts.append(f.read())
    except OSError as e:
      raise sample.SampleError(f"--prompt_file={args.prompt_file}: {e.strerror}") from None
  if not texts:
    raise sample.SampleError("give --prompt=TEXT (or --prompt_file=FILE)")
  if args.num_samples < 1:
    raise sample.SampleError(f"--num_samples={args.num_samples}: must be at least 1")
  params, config = build_lib.restore_params(args.workdir, args.step)
  if args.one_device:
    config = build_lib.on_one_device(config)
  params, mesh = sample.place(params, config,
                              jax.local_devices()[:1] if args.one_device else None)
  try:
    tokenizer = tokenizer_lib.load_tokenizer(WorkDir(args.workdir).tokenizer)
  except (OSError, ValueError) as e:
    raise sources.DataError(str(e)) from None
  prompts = [tokenizer.encode(t) for t in texts for _ in range(args.num_samples)]
  samples = sample.generate(params, config, prompts, args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, eos_id=tokenizer.eos_id(), mesh=mesh)
  for prompt, drawn in zip(prompts, samples):
    print(tokenizer.decode(prompt + drawn))
    print("-" * 40)
  return 0


def run() -> None:
  """Console-script entry point (`mixtral-sample`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
