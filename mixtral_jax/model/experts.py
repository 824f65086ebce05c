"""A bank of E SwiGLU experts applied to a grouped buffer of rows: y = (silu(x W1) * x W3) W2."""

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mixtral_jax.model import grouped_matmul
from mixtral_jax.model.dispatch import Layout
from mixtral_jax.model.layers import kernel_init


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


def _batched(rows, gate_up, down, layout: Optional[Layout]):
  """Equal groups (R = E · rows per expert): one batched matmul per projection."""
  num_rows, hidden = rows.shape
  e, inter = gate_up.shape[0], gate_up.shape[-1] // 2
  x = rows.reshape(e, -1, hidden)  # [E, C, D]
  pre = checkpoint_name(grouped_matmul.batched_matmul(x, gate_up), _PRE_ACTIVATIONS)
  h = swiglu(pre.reshape(e, -1, 2, inter))
  return grouped_matmul.batched_matmul(h, down).reshape(num_rows, hidden)


def _ragged_dot(rows, gate_up, down, layout: Layout):
  """XLA's grouped matmul over the dropless layout's group sizes (GPU, TPU)."""
  num_rows = rows.shape[0]
  inter = gate_up.shape[-1] // 2
  pre = checkpoint_name(grouped_matmul.ragged_matmul(rows, gate_up, layout.group_sizes),
                        _PRE_ACTIVATIONS)
  h = swiglu(pre.reshape(num_rows, 2, inter))
  return grouped_matmul.ragged_matmul(h, down, layout.group_sizes)


def _blocked(rows, gate_up, down, layout: Layout):
  """A loop over the dropless layout's used blocks, each one expert's (CPU)."""
  num_rows, hidden = rows.shape
  blocks = rows.reshape(-1, layout.block_size, hidden)  # [nb, B, D]
  y = grouped_matmul.blocked_swiglu(blocks, gate_up, down, layout.block_expert,
                                    layout.num_active_blocks)
  return y.reshape(num_rows, hidden)


# The SwiGLU kernels by name: rows [R, D] (in the weights' dtype), gate_up [E, D, 2I] (fused),
# down [E, I, D], the dispatch layout → [R, D].
_KERNELS = {"batched": _batched, "ragged_dot": _ragged_dot, "blocked": _blocked}


def expert_kernel(name: str) -> Callable:
  """The experts' kernel `name` ("batched", "blocked" or "ragged_dot"), for `apply_experts`."""
  if name not in _KERNELS:
    raise ValueError(f"unknown grouped matmul {name!r} (resolve 'auto' with config.model_config)")
  return _KERNELS[name]


def _swiglu_experts(rows, gate_up, down, kernel: Callable, layout: Optional[Layout]):
  """rows [R, D], gate_up [E, D, 2, I], down [E, I, D] → [R, D] through `kernel`."""
  e, hidden, _, inter = gate_up.shape
  return kernel(rows, gate_up.reshape(e, hidden, 2 * inter), down, layout)


def apply_experts(rows, gate_up, down, kernel: Callable, layout: Optional[Layout] = None,
                  chunks: int = 1, gather=_no_gather):
  """SwiGLU of grouped rows [R, D] with each group's expert → [R, D].

  kernel: an `expert_kernel` — "batched" (R = E · rows-per-expert, equal groups), "blocked" or
  "ragged_dot" (the dropless `layout` says which rows belong to which expert). `gather(gate_up, down)` gives the
  weights whole (expert_parallel all-gathers their FSDP shards).

  `chunks` > 1 takes the experts' intermediate width I in that many slices in turn (a
  `lax.scan`): each slice is one term of the down projection's sum, so the result is the same,
  but only one slice's gathered weights and weight gradients are live at a time. Each slice
  keeps its pre-activations [R, 2I / chunks] for the backward pass and gathers its weights
  again there, so no FLOPs are added (but on the CPU's blocked loop, which recomputes them).
  """
  rows = rows.astype(gate_up.dtype)
  if chunks == 1:
    return _swiglu_experts(rows, *gather(gate_up, down), kernel, layout)
  e, shard, _, inter = gate_up.shape  # D may be an FSDP shard here (see `gather`)
  if inter % chunks:
    raise ValueError(f"{chunks} chunks do not divide the experts' local width {inter}")
  width = inter // chunks
  gate_up = jnp.moveaxis(gate_up.reshape(e, shard, 2, chunks, width), 3, 0)  # [n, E, D, 2, I/n]
  down = jnp.moveaxis(down.reshape(e, chunks, width, -1), 1, 0)  # [n, E, I/n, D]

  @functools.partial(jax.checkpoint,
                     policy=jax.checkpoint_policies.save_only_these_names(_PRE_ACTIVATIONS))
  def one(weights):
    return _swiglu_experts(rows, *gather(*weights), kernel, layout)

  def step(total, weights):
    return total + one(weights).astype(jnp.float32), None

  # The first slice starts the sum: a carry typed like the body's result, also in shard_map.
  first, _ = step(0.0, (gate_up[0], down[0]))
  total, _ = jax.lax.scan(step, first, (gate_up[1:], down[1:]))
  return total.astype(rows.dtype)
