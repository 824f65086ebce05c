"""Expert parallelism: the MoE feed-forward inside `jax.shard_map` over the whole mesh.

Each device routes its own tokens, packs the slots bound for each `expert`-axis peer into a
fixed-size buffer, exchanges buffers with `all_to_all`, runs its E/ep local experts, sends the
results back with a second `all_to_all` and combines them. Expert weights arrive sharded: `exp`
over `expert`, `embed` over `fsdp` (all-gathered here, reduce-scattered in the backward pass)
and `mlp` over `tensor` (partial outputs summed with `psum`).

Buffer sizes (n local tokens, k choices, ep expert shards, E/ep local experts):
- capacity: C = ceil(capacity_factor · n · k / E) rows per (source, expert) pair.
- dropless: n · min(k, E/ep) rows per (source, destination) pair, the most a source can ever
  send to one destination, so nothing is dropped; the receiver's grouped matmul skips padding.
  With all_to_all="ragged" (GPU/TPU: XLA:CPU lacks it) the buffers keep that layout but
  `jax.lax.ragged_all_to_all` moves only the used rows, after one tiny all_to_all of counts.
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mixtral_jax import dispatch as dispatch_lib
from mixtral_jax import sharding
from mixtral_jax.experts import DOWN_AXES, GATE_UP_AXES, apply_experts

_EXPERT_AXIS, _FSDP_AXIS, _TENSOR_AXIS = "expert", "fsdp", "tensor"


def _exchange(x):
  """Sends the i-th of ep equal chunks of x's rows to expert-axis peer i; gets theirs back."""
  return jax.lax.all_to_all(x, _EXPERT_AXIS, 0, 0, tiled=True)


def _ragged_exchange(x, send_sizes, recv_sizes, fill):
  """Like `_exchange` on buffers of ep equal chunks, moving only each chunk's first rows.

  Chunk j of x holds send_sizes[j] used rows for peer j; this device's rows land in chunk
  `my index` of every peer's result, whose unused rows are `fill`.
  """
  ep = send_sizes.shape[0]
  chunk = x.shape[0] // ep
  offsets = jnp.arange(ep, dtype=jnp.int32) * chunk
  my_offset = jnp.full((ep,), jax.lax.axis_index(_EXPERT_AXIS) * chunk, jnp.int32)
  return jax.lax.ragged_all_to_all(x, jnp.full_like(x, fill), offsets, send_sizes, my_offset,
                                   recv_sizes, axis_name=_EXPERT_AXIS)


def _gather_weights(gate_up, down):
  """The experts' FSDP shards → whole weights (the backward pass reduce-scatters their
  gradients)."""
  return (jax.lax.all_gather(gate_up, _FSDP_AXIS, axis=1, tiled=True),
          jax.lax.all_gather(down, _FSDP_AXIS, axis=2, tiled=True))


def _capacity_local(tokens, expert_index, combine_weights, gate_up, down, capacity_factor,
                    chunks):
  n, k = expert_index.shape
  ep = jax.lax.axis_size(_EXPERT_AXIS)
  e_local, hidden = gate_up.shape[0], tokens.shape[1]
  capacity = dispatch_lib.expert_capacity(n, e_local * ep, k, capacity_factor)
  layout = dispatch_lib.capacity_layout(expert_index, e_local * ep, capacity)
  received = _exchange(dispatch_lib.gather_rows(tokens, layout))  # [ep(src) · E/ep · C, D]
  by_expert = received.reshape(ep, e_local, capacity, hidden).swapaxes(0, 1)
  out = apply_experts(by_expert.reshape(-1, hidden), gate_up, down, "batched", chunks=chunks,
                      gather=_gather_weights)
  out = out.reshape(e_local, ep, capacity, hidden).swapaxes(0, 1).reshape(-1, hidden)
  return dispatch_lib.combine(_exchange(out), layout, combine_weights), layout.dropped_fraction


def _dropless_local(tokens, expert_index, combine_weights, gate_up, down, block_size, matmul,
                    ragged: bool, chunks: int):
  n, k = expert_index.shape
  ep = jax.lax.axis_size(_EXPERT_AXIS)
  e_local = gate_up.shape[0]
  per_peer = n * min(k, e_local)
  destination = expert_index // e_local
  send_layout = dispatch_lib.capacity_layout(destination, ep, per_peer)
  # Each row travels with its expert's local id; e_local marks an empty padding row.
  slot_expert = jnp.append((expert_index % e_local).T.reshape(-1), e_local)
  rows = dispatch_lib.gather_rows(tokens, send_layout)
  row_expert = slot_expert[send_layout.row_slot]
  if ragged:
    send_sizes = jnp.zeros(ep, jnp.int32).at[destination.reshape(-1)].add(1)
    recv_sizes = _exchange(send_sizes)
    there = lambda x, fill: _ragged_exchange(x, send_sizes, recv_sizes, fill)
    back = lambda x: _ragged_exchange(x, recv_sizes, send_sizes, 0)
  else:
    there, back = lambda x, fill: _exchange(x), _exchange
  received = there(rows, 0)  # [ep · per_peer, D]
  received_expert = there(row_expert, e_local)  # [ep · per_peer]

  layout = dispatch_lib.dropless_layout(
      received_expert[:, None], e_local,
      dispatch_lib.dropless_block_size(block_size, n * k, e_local))
  out = apply_experts(dispatch_lib.gather_rows(received, layout), gate_up, down, matmul, layout,
                      chunks, _gather_weights)
  out = dispatch_lib.combine(out, layout, jnp.ones((received.shape[0], 1), out.dtype))
  return (dispatch_lib.combine(back(out), send_layout, combine_weights),
          jnp.zeros((), jnp.float32))


def expert_parallel_moe(tokens, expert_index, combine_weights, gate_up, down,
                        config: ml_collections.FrozenConfigDict, mesh: Mesh):
  """tokens [N, D] (batch-sharded), routing [N, k], experts [E, …] → (out [N, D], dropped).

  `config` is the model config (see config.model_config): its dispatch, capacity_factor,
  block_size, grouped_matmul and all_to_all choose how.
  """
  batch_spec = sharding.logical_to_spec(("batch", None))
  gate_up_spec = sharding.logical_to_spec(GATE_UP_AXES)
  down_spec = sharding.logical_to_spec(DOWN_AXES)

  def local(tokens, expert_index, combine_weights, gate_up, down):
    if config.dispatch == "capacity":
      out, dropped = _capacity_local(tokens, expert_index, combine_weights, gate_up, down,
                                     config.capacity_factor, config.expert_mlp_chunks)
    else:
      out, dropped = _dropless_local(tokens, expert_index, combine_weights, gate_up, down,
                                     config.block_size, config.grouped_matmul,
                                     ragged=config.all_to_all == "ragged",
                                     chunks=config.expert_mlp_chunks)
    return (jax.lax.psum(out, _TENSOR_AXIS),
            jax.lax.pmean(dropped, sharding.BATCH_AXES))

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(batch_spec, batch_spec, batch_spec, gate_up_spec, down_spec),
      out_specs=(batch_spec, jax.sharding.PartitionSpec()))(
          tokens, expert_index, combine_weights, gate_up, down)
