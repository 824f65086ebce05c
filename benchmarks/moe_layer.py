"""MoE layer fwd+bwd time per dispatch ÷ a dense SwiGLU FFN with the same active parameters.

Run: `make bench` (or `python benchmarks/moe_layer.py [--batch B] [--seq_len T]
[--repeats R]`). Every
variant is compiled first, then all are timed in interleaved rounds on the same inputs, and
each reports its best round, so machine load affects them alike. The table goes to stdout and
into benchmarks/README.md between the `moe_layer` markers.
"""

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import publish  # noqa: E402
from configs import default  # noqa: E402
from mixtral_jax import config as config_lib  # noqa: E402
from mixtral_jax.model import oracle  # noqa: E402
from mixtral_jax.model.layers import kernel_init  # noqa: E402
from mixtral_jax.model.moe import MoE  # noqa: E402


def moe_variant(name, x, cotangent, **overrides):
  model = default.get_config().model
  model.update(num_experts=8, experts_per_token=2, intermediate_size=INTER, **overrides)
  module = MoE(config_lib.model_config(model, jax.default_backend()))
  params = nn.unbox(module.init(jax.random.PRNGKey(0), x))["params"]
  loss = lambda p, x: jnp.sum(module.apply({"params": p}, x)[0] * cotangent)
  return name, jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.seq_len, HIDDEN))
  cotangent = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  variants = [
      moe_variant("dropless, blocked (block 128)", x, cotangent, dispatch="dropless",
                  grouped_matmul="blocked", block_size=128),
      moe_variant("dropless, blocked (block 256)", x, cotangent, dispatch="dropless",
                  grouped_matmul="blocked", block_size=256),
      moe_variant("dropless, ragged_dot", x, cotangent, dispatch="dropless",
                  grouped_matmul="ragged_dot", block_size=8),
      moe_variant("capacity 1.25, batched einsum", x, cotangent, dispatch="capacity",
                  capacity_factor=1.25),
  ]
  dense_moe_loss = lambda p, x: jnp.sum(oracle.dense_moe(p, x, 2) * cotangent)
  variants.append(("dense-masked oracle (every expert)",
                   jax.jit(jax.value_and_grad(dense_moe_loss, argnums=(0, 1))), variants[0][2]))
  dense_params = {"gate_up": kernel_init(jax.random.PRNGKey(3), (HIDDEN, 2, 2 * INTER)),
                  "down": kernel_init(jax.random.PRNGKey(4), (2 * INTER, HIDDEN))}
  dense_loss = lambda p, x: jnp.sum(oracle.dense_swiglu(p, x) * cotangent)
  baseline = ("dense SwiGLU, hidden k·I", jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1))),
              dense_params)
  variants.append(baseline)

  for _, fn, params in variants:  # compile and warm up
    jax.block_until_ready(fn(params, x))
  best = {name: float("inf") for name, _, _ in variants}
  for _ in range(args.repeats):
    for name, fn, params in variants:
      start = time.perf_counter()
      jax.block_until_ready(fn(params, x))
      best[name] = min(best[name], time.perf_counter() - start)

  base = best[baseline[0]]
  lines = [f"Tokens {args.batch}×{args.seq_len}, hidden {HIDDEN}, expert intermediate {INTER}, "
           f"E=8, k=2, f32, fwd+bwd, best of {args.repeats} interleaved rounds, "
           f"{jax.device_count()} {jax.default_backend()} device(s).", "",
           "| variant | ms | ÷ dense FFN |", "|---|---:|---:|"]
  for name, _, _ in variants:
    lines.append(f"| {name} | {best[name] * 1e3:.1f} | {best[name] / base:.2f} |")
  publish("moe_layer", lines)


HIDDEN, INTER = 256, 512

if __name__ == "__main__":
  main()
