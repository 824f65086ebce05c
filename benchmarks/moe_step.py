"""Whole train step of the MoE model ÷ the same model with a dense FFN of equal active size.

Issue 7, goal 3: the router, sort, gathers and combine of the MoE must be nearly free, so a
training step of the reference config (E=8, k=2, expert intermediate I) should cost at most
1.15× the step of the same model whose every MoE layer is replaced by one dense SwiGLU FFN of
intermediate k·I — the same active matmul FLOPs per token, no routing. Both steps are the
train step `mixtral-train` runs (`build.build`: AdamW, state donated); the dense one has fewer
parameters (the optimizer touches k/E of the expert weights), which favours it.

Rounds alternate between the two, so load falls on both alike; the median per variant counts.

Run: `python benchmarks/moe_step.py [--rounds R] [--no-write]`.
"""

import argparse
import contextlib
import os
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.reference import Ours, make_batches, reference_config  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from mixtral_jax.model import mixtral as model_lib  # noqa: E402
from mixtral_jax.model.experts import swiglu  # noqa: E402
from mixtral_jax.model.layers import kernel_init  # noqa: E402
from mixtral_jax.model.moe import MoEStats  # noqa: E402
from mixtral_jax.runtime import cpu_runtime  # noqa: E402


class DenseFFN(nn.Module):
  """A SwiGLU FFN standing in for an MoE layer; returns zero router statistics."""
  hidden_size: int
  num_experts: int

  @nn.compact
  def __call__(self, x, token_mask=None, deterministic=True):  # x [B, T, D]
    d = x.shape[-1]
    gate_up = self.param("gate_up", nn.with_logical_partitioning(kernel_init, ("embed", None,
                                                                               "mlp")),
                         (d, 2, self.hidden_size), jnp.float32)
    down = self.param("down", nn.with_logical_partitioning(kernel_init, ("mlp", "embed")),
                      (self.hidden_size, d), jnp.float32)
    # Computed in x's dtype (bf16 on accelerators), as the experts are.
    y = swiglu(jnp.einsum("btd,dci->btci", x, gate_up.astype(x.dtype))) @ down.astype(x.dtype)
    zero = jnp.zeros((), jnp.float32)
    load = jnp.zeros(self.num_experts)
    return y, MoEStats(aux_loss=zero, z_loss=zero, expert_load=load, mean_probability=load,
                       dropped_fraction=zero, router_entropy=zero)


@contextlib.contextmanager
def dense_ffn_layers():
  """While active, models built and traced get DenseFFN (hidden k·I) in place of every MoE."""
  original = model_lib.MoE

  def make(config, mesh=None, *, name):
    return DenseFFN(config.experts_per_token * config.intermediate_size, config.num_experts,
                    name=name)

  model_lib.MoE = make
  try:
    yield
  finally:
    model_lib.MoE = original


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")
  args = parser.parse_args()
  cpu_runtime.reuse_step_memory()  # as mixtral-train does

  config = reference_config(1)
  m = config.model
  batch = jax.device_put(make_batches(1, config.global_batch_size, config.seq_len,
                                      m.vocab_size)[0])
  moe = Ours(config)
  moe.timed_step(batch)  # compile outside the patch: the real MoE
  with dense_ffn_layers():
    dense = Ours(config)
    dense.timed_step(batch)  # traced and compiled with DenseFFN layers
  seconds = {"moe": [], "dense": []}
  for _ in range(args.rounds):
    seconds["moe"].append(moe.timed_step(batch))
    seconds["dense"].append(dense.timed_step(batch))
  moe_s, dense_s = (statistics.median(seconds[k]) for k in ("moe", "dense"))
  count = lambda t: sum(x.size for x in jax.tree.leaves(t.state.params)) / 1e6
  lines = [
      f"Issue 7 reference config (hidden {m.hidden_size}, {m.num_layers} layers, batch "
      f"{config.global_batch_size}×{config.seq_len}, AdamW, f32), 1 {jax.default_backend()} "
      f"device; median of {args.rounds} alternating steps.", "",
      "| model | parameters (M) | train step ms |", "|---|---:|---:|",
      f"| MoE: E={m.num_experts}, k={m.experts_per_token}, I={m.intermediate_size}, dropless "
      f"| {count(moe):.1f} | {moe_s * 1e3:.0f} |",
      f"| dense SwiGLU FFN, intermediate k·I = {m.experts_per_token * m.intermediate_size} | "
      f"{count(dense):.1f} | {dense_s * 1e3:.0f} |", "",
      f"**MoE step ÷ dense step = {moe_s / dense_s:.2f}** (goal ≤ 1.15)"]
  publish("moe_step", lines, write=not args.no_write)


if __name__ == "__main__":
  main()
