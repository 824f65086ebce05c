"""A bank of E SwiGLU experts applied to a grouped buffer of rows: y = (silu(x W1) * x W3) W2."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixtral_jax import grouped_matmul
from mixtral_jax.dispatch import Layout
from mixtral_jax.layers import kernel_init


# Logical axes of the expert weights (gate_up [E, D, 2, I], down [E, I, D]).
GATE_UP_AXES = ("exp", "embed", None, "mlp")
DOWN_AXES = ("exp", "mlp", "embed")


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


def apply_experts(rows, gate_up, down, matmul: str, layout: Optional[Layout] = None):
  """SwiGLU of grouped rows [R, D] with each group's expert → [R, D].

  matmul: "batched" (R = E · rows-per-expert, equal groups), "blocked" or "ragged_dot" (the
  dropless `layout` says which rows belong to which expert).
  """
  num_rows, hidden = rows.shape
  e, _, _, inter = gate_up.shape
  gate_up = gate_up.reshape(e, hidden, 2 * inter)
  rows = rows.astype(gate_up.dtype)
  if matmul == "batched":
    x = rows.reshape(e, -1, hidden)  # [E, C, D]
    h = swiglu(grouped_matmul.batched_matmul(x, gate_up).reshape(e, -1, 2, inter))
    return grouped_matmul.batched_matmul(h, down).reshape(num_rows, hidden)
  if matmul == "ragged_dot":
    h = swiglu(grouped_matmul.ragged_matmul(rows, gate_up, layout.group_sizes)
               .reshape(num_rows, 2, inter))
    return grouped_matmul.ragged_matmul(h, down, layout.group_sizes)
  if matmul != "blocked":
    raise ValueError(f"unknown grouped matmul {matmul!r} (resolve 'auto' with config.model_config)")
  blocks = rows.reshape(-1, layout.block_size, hidden)  # [nb, B, D]
  y = grouped_matmul.blocked_swiglu(blocks, gate_up, down, layout.block_expert,
                                    layout.num_active_blocks)
  return y.reshape(num_rows, hidden)
