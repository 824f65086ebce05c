"""Token dispatch: where each (token, choice) slot goes in the experts' grouped buffer, and back.

Both modes sort the T·k slots by expert (stable, choice-major so first choices win capacity, as
in GShard) and describe the result as a `Layout`:
- dropless: each expert's group is padded to a multiple of `block_size`, so every block of rows
  belongs to one expert and a grouped matmul can skip the unused tail. Nothing is ever dropped.
- capacity: each expert gets exactly C = ceil(capacity_factor · T · k / E) rows; slots past C are
  dropped (their token keeps only its residual and its other experts' outputs).
Rows are moved by gathers, whose gradients are scatter-adds: no [T, E, C] one-hot tensors.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
  slot_row: jax.Array  # [T*k] int32: buffer row of each slot (choice-major); num_rows if dropped
  row_slot: jax.Array  # [R] int32: slot feeding each buffer row; T*k for an empty padding row
  group_sizes: jax.Array  # [E] int32: rows per expert in the buffer (padded, dropless)
  block_expert: jax.Array  # [R / block_size] int32: expert owning each block of rows
  num_active_blocks: jax.Array  # [] int32: blocks holding at least one slot, all at the front
  block_size: int  # rows per block (= capacity for dispatch="capacity")
  dropped_fraction: jax.Array  # [] float32: share of slots that found no room


def expert_capacity(num_tokens: int, num_experts: int, experts_per_token: int,
                    capacity_factor: float) -> int:
  """GShard/Switch capacity: ceil(capacity_factor · tokens · k / E)."""
  return max(1, math.ceil(capacity_factor * num_tokens * experts_per_token / num_experts))


def dropless_block_size(block_size: int, num_rows: int, num_groups: int) -> int:
  """`block_size`, capped at a balanced group's rows: blocks larger than that only add padding."""
  return max(1, min(block_size, -(-num_rows // num_groups)))


def _sort_slots(expert_index, num_experts: int):
  """Sorts slots by expert; returns (order, expert of sorted slot, rank within its expert, sizes).

  Slots with an expert id >= num_experts (padding) sort last and are not counted in `sizes`.
  """
  flat_expert = expert_index.T.reshape(-1)  # [k*T], choice-major
  order = jnp.argsort(flat_expert, stable=True)  # [N]
  sorted_expert = jnp.minimum(flat_expert[order], num_experts)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[sorted_expert].add(1)
  group_starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(order.shape[0], dtype=jnp.int32) - group_starts[sorted_expert]
  return order, sorted_expert, rank, counts[:num_experts]


def _scatter_layout(order, sorted_row, num_rows: int):
  """Inverts the sort: slot → row, and row → slot (empty rows point at slot N)."""
  num_slots = order.shape[0]
  slot_row = jnp.zeros(num_slots, jnp.int32).at[order].set(sorted_row)
  row_slot = jnp.full(num_rows + 1, num_slots, jnp.int32).at[sorted_row].set(
      order.astype(jnp.int32))
  return slot_row, row_slot[:num_rows]


def dropless_layout(expert_index, num_experts: int, block_size: int) -> Layout:
  """Sorted layout with each expert's group padded to a multiple of `block_size`; drops nothing.

  Slots whose expert id is >= num_experts are padding: they get no row.
  """
  num_slots = expert_index.size
  # Worst case: every expert's last block holds a single slot.
  num_blocks = (num_slots + num_experts * (block_size - 1)) // block_size
  num_rows = num_blocks * block_size
  order, sorted_expert, rank, group_sizes = _sort_slots(expert_index, num_experts)
  padded_sizes = (group_sizes + block_size - 1) // block_size * block_size  # [E]
  padded_ends = jnp.cumsum(padded_sizes)
  padded_starts = jnp.append(padded_ends - padded_sizes, num_rows)  # padding slots → num_rows
  sorted_row = jnp.where(sorted_expert < num_experts, padded_starts[sorted_expert] + rank,
                         num_rows)
  slot_row, row_slot = _scatter_layout(order, sorted_row, num_rows)
  block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  block_expert = jnp.minimum(jnp.searchsorted(padded_ends, block_start, side="right"),
                             num_experts - 1).astype(jnp.int32)
  return Layout(slot_row, row_slot, padded_sizes, block_expert,
                (padded_ends[-1] // block_size).astype(jnp.int32), block_size,
                jnp.zeros((), jnp.float32))


def capacity_layout(expert_index, num_experts: int, capacity: int) -> Layout:
  """Fixed `capacity` rows per expert ([E, C] buffer); slots beyond it are dropped."""
  num_rows = num_experts * capacity
  order, sorted_expert, rank, group_sizes = _sort_slots(expert_index, num_experts)
  kept = rank < capacity
  sorted_row = jnp.where(kept, sorted_expert * capacity + rank, num_rows)
  slot_row, row_slot = _scatter_layout(order, sorted_row, num_rows)
  dropped = 1.0 - jnp.mean(kept.astype(jnp.float32))
  return Layout(slot_row, row_slot, jnp.full((num_experts,), capacity, jnp.int32),
                jnp.arange(num_experts, dtype=jnp.int32), jnp.int32(num_experts), capacity,
                dropped)


def gather_rows(x, layout: Layout):
  """Builds the grouped buffer [R, D] from tokens x [T, D]; padding rows are zero."""
  num_tokens = x.shape[0]
  num_slots = layout.slot_row.shape[0]
  row_token = jnp.where(layout.row_slot < num_slots, layout.row_slot % num_tokens, num_tokens)
  padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
  return padded[row_token]


def combine(rows, layout: Layout, combine_weights):
  """Weighted sum of each token's expert outputs: rows [R, D], weights [T, k] → [T, D]."""
  num_tokens, k = combine_weights.shape
  padded = jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)])  # dropped → 0
  per_slot = padded[layout.slot_row].reshape(k, num_tokens, rows.shape[1])  # [k, T, D]
  weights = combine_weights.T.astype(rows.dtype)[..., None]  # [k, T, 1]
  # k products added in turn, not a reduce over the k axis: XLA:CPU fuses such a reduce with the
  # gather feeding it into a slow loop (benchmarks/README.md, levers table).
  out = per_slot[0] * weights[0]
  for choice in range(1, k):
    out = out + per_slot[choice] * weights[choice]
  return out
