"""Compile time of the train step: the default config, its layer count doubled, and the reference.

XLA compiles every layer of the unrolled stack separately, so compile time grows with depth;
this records how fast. Each row traces, lowers and compiles the train step `mixtral-train`
runs (`build.build`: sharded, state donated) in a fresh jit, so no cache is reused, and reports
the best of `--repeats`. The persistent compilation cache is off for the measurement.

Run: `python benchmarks/compile_time.py [--repeats R] [--no-write]`.
"""

import argparse
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.reference import reference_config  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from configs import default  # noqa: E402
from mixtral_jax.training import build  # noqa: E402


def compile_seconds(config) -> tuple[float, float]:
  """(trace + lower seconds, XLA compile seconds) of a fresh jit of the config's train step."""
  setup = build.build(config, abstract=True)
  start = time.perf_counter()
  lowered = setup.train_step.lower(setup.abstract_state, setup.abstract_batch())
  traced = time.perf_counter()
  lowered.compile()
  return traced - start, time.perf_counter() - traced


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)

  rows = []
  for layers in (4, 8, 16):
    config = default.get_config()
    config.model.num_layers = layers
    rows.append((f"default (hidden {config.model.hidden_size}), {layers} layers", config))
  rows.append(("issue 7 reference (hidden 256), 4 layers", reference_config(1)))
  lines = [f"Jitted train step, 1 {jax.default_backend()} device, JAX {jax.__version__}, best of "
           f"{args.repeats} fresh compiles each.", "",
           "| config | trace + lower s | XLA compile s | total s |", "|---|---:|---:|---:|"]
  for name, config in rows:
    best = min((compile_seconds(config) for _ in range(args.repeats)), key=sum)
    lines.append(f"| {name} | {best[0]:.1f} | {best[1]:.1f} | {sum(best):.1f} |")
    print(lines[-1], flush=True)
  publish("compile_time", lines, write=not args.no_write)


if __name__ == "__main__":
  main()
