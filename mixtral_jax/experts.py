"""A bank of E SwiGLU experts applied to a grouped buffer of rows: y = (silu(x W1) * x W3) W2."""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mixtral_jax import grouped_matmul
from mixtral_jax.dispatch import Layout
from mixtral_jax.layers import kernel_init


# Logical axes of the expert weights (gate_up [E, D, 2, I], down [E, I, D]).
GATE_UP_AXES = ("exp", "embed", None, "mlp")
DOWN_AXES = ("exp", "mlp", "embed")
# The name under which chunked experts keep their pre-activations for the backward pass.
_PRE_ACTIVATIONS = "expert_pre_activations"


def swiglu(gate_up):
  """gate_up [..., 2, I] → silu(gate) * up [..., I]."""
  return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


class ExpertWeights(nn.Module):
  """Weights of E SwiGLU experts, sharded over the `exp` logical axis.

  W1 and W3 are stored fused as `gate_up` [E, D, 2, I] so one matmul computes both, and a
  split of I keeps each gate column beside its up column.
  """
  num_experts: int
  hidden_size: int
  intermediate_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self):
    """→ (gate_up [E, D, 2, I], down [E, I, D]) in the compute dtype."""
    e, d, i = self.num_experts, self.hidden_size, self.intermediate_size
    gate_up = self.param(
        "gate_up", nn.with_logical_partitioning(kernel_init, GATE_UP_AXES), (e, d, 2, i),
        jnp.float32)
    down = self.param("down", nn.with_logical_partitioning(kernel_init, DOWN_AXES), (e, i, d),
                      jnp.float32)
    return gate_up.astype(self.dtype), down.astype(self.dtype)


def _no_gather(gate_up, down):
  return gate_up, down


def _swiglu_experts(rows, gate_up, down, matmul: str, layout: Optional[Layout]):
  """rows [R, D] (in the weights' dtype), gate_up [E, D, 2, I], down [E, I, D] → [R, D]."""
  num_rows, hidden = rows.shape
  e, _, _, inter = gate_up.shape
  gate_up = gate_up.reshape(e, hidden, 2 * inter)
  if matmul == "batched":
    x = rows.reshape(e, -1, hidden)  # [E, C, D]
    pre = checkpoint_name(grouped_matmul.batched_matmul(x, gate_up), _PRE_ACTIVATIONS)
    h = swiglu(pre.reshape(e, -1, 2, inter))
    return grouped_matmul.batched_matmul(h, down).reshape(num_rows, hidden)
  if matmul == "ragged_dot":
    pre = checkpoint_name(grouped_matmul.ragged_matmul(rows, gate_up, layout.group_sizes),
                          _PRE_ACTIVATIONS)
    h = swiglu(pre.reshape(num_rows, 2, inter))
    return grouped_matmul.ragged_matmul(h, down, layout.group_sizes)
  if matmul != "blocked":
    raise ValueError(f"unknown grouped matmul {matmul!r} (resolve 'auto' with config.model_config)")
  blocks = rows.reshape(-1, layout.block_size, hidden)  # [nb, B, D]
  y = grouped_matmul.blocked_swiglu(blocks, gate_up, down, layout.block_expert,
                                    layout.num_active_blocks)
  return y.reshape(num_rows, hidden)


def apply_experts(rows, gate_up, down, matmul: str, layout: Optional[Layout] = None,
                  chunks: int = 1, gather=_no_gather):
  """SwiGLU of grouped rows [R, D] with each group's expert → [R, D].

  matmul: "batched" (R = E · rows-per-expert, equal groups), "blocked" or "ragged_dot" (the
  dropless `layout` says which rows belong to which expert). `gather(gate_up, down)` gives the
  weights whole (expert_parallel all-gathers their FSDP shards).

  `chunks` > 1 takes the experts' intermediate width I in that many slices in turn (a
  `lax.scan`): each slice is one term of the down projection's sum, so the result is the same,
  but only one slice's gathered weights and weight gradients are live at a time. Each slice
  keeps its pre-activations [R, 2I / chunks] for the backward pass and gathers its weights
  again there, so no FLOPs are added (but on the CPU's blocked loop, which recomputes them).
  """
  rows = rows.astype(gate_up.dtype)
  if chunks == 1:
    return _swiglu_experts(rows, *gather(gate_up, down), matmul, layout)
  e, shard, _, inter = gate_up.shape  # D may be an FSDP shard here (see `gather`)
  if inter % chunks:
    raise ValueError(f"{chunks} chunks do not divide the experts' local width {inter}")
  width = inter // chunks
  gate_up = jnp.moveaxis(gate_up.reshape(e, shard, 2, chunks, width), 3, 0)  # [n, E, D, 2, I/n]
  down = jnp.moveaxis(down.reshape(e, chunks, width, -1), 1, 0)  # [n, E, I/n, D]

  @functools.partial(jax.checkpoint,
                     policy=jax.checkpoint_policies.save_only_these_names(_PRE_ACTIVATIONS))
  def one(weights):
    return _swiglu_experts(rows, *gather(*weights), matmul, layout)

  def step(total, weights):
    return total + one(weights).astype(jnp.float32), None

  # The first slice starts the sum: a carry typed like the body's result, also in shard_map.
  first, _ = step(0.0, (gate_up[0], down[0]))
  total, _ = jax.lax.scan(step, first, (gate_up[1:], down[1:]))
  return total.astype(rows.dtype)
