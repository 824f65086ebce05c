"""Expert parallelism: the MoE's dispatcher on a multi-device mesh, inside `jax.shard_map`.

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

from mixtral_jax.model import dispatch as dispatch_lib
from mixtral_jax.model.experts import DOWN_AXES, GATE_UP_AXES, apply_experts, expert_kernel
from mixtral_jax.model.router import Routing
from mixtral_jax.parallel import sharding

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


def _padded_exchanges(destination, ep: int):
  """(there, back): the all-to-alls of whole, padded buffers."""
  return (lambda x, fill: _exchange(x)), _exchange


def _ragged_exchanges(destination, ep: int):
  """(there, back): ragged all-to-alls moving only the used rows, after one tiny all-to-all of
  the counts (GPU/TPU: XLA:CPU lacks it)."""
  send_sizes = jnp.zeros(ep, jnp.int32).at[destination.reshape(-1)].add(1)
  recv_sizes = _exchange(send_sizes)
  return (lambda x, fill: _ragged_exchange(x, send_sizes, recv_sizes, fill),
          lambda x: _ragged_exchange(x, recv_sizes, send_sizes, 0))


class ExpertParallelDispatcher:
  """The MoE feed-forward inside `jax.shard_map` over the whole mesh (see the module's note);
  `config` is the resolved model config: its dispatch, capacity_factor, block_size,
  grouped_matmul and all_to_all choose how, here, once."""

  def __init__(self, config: ml_collections.FrozenConfigDict, mesh: Mesh):
    self.mesh, self.ep = mesh, mesh.shape[_EXPERT_AXIS]
    self.num_experts = config.num_experts
    self.local_experts = config.num_experts // self.ep
    self.chunks, self.block_size = config.expert_mlp_chunks, config.block_size
    self.capacity_factor = config.capacity_factor
    if config.dispatch == "capacity":
      self._local, self.kernel = self._capacity_local, expert_kernel("batched")
    else:
      self._local, self.kernel = self._dropless_local, expert_kernel(config.grouped_matmul)
    self._exchanges = _ragged_exchanges if config.all_to_all == "ragged" else _padded_exchanges

  def __call__(self, tokens, routing: Routing, gate_up, down):
    """tokens [N, D] (batch-sharded), routing [N, k], experts [E, …] → (out [N, D], dropped)."""
    batch_spec = sharding.logical_to_spec(("batch", None))

    def local(tokens, expert_index, combine_weights, gate_up, down):
      out, dropped = self._local(tokens, expert_index, combine_weights, gate_up, down)
      return (jax.lax.psum(out, _TENSOR_AXIS),
              jax.lax.pmean(dropped, sharding.BATCH_AXES))

    return jax.shard_map(
        local, mesh=self.mesh,
        in_specs=(batch_spec, batch_spec, batch_spec, sharding.logical_to_spec(GATE_UP_AXES),
                  sharding.logical_to_spec(DOWN_AXES)),
        out_specs=(batch_spec, jax.sharding.PartitionSpec()))(
            tokens.astype(gate_up.dtype), routing.expert_index, routing.combine_weights,
            gate_up, down)

  def _capacity_local(self, tokens, expert_index, combine_weights, gate_up, down):
    n, k = expert_index.shape
    ep, e_local, hidden = self.ep, self.local_experts, tokens.shape[1]
    capacity = dispatch_lib.expert_capacity(n, self.num_experts, k, self.capacity_factor)
    layout = dispatch_lib.capacity_layout(expert_index, self.num_experts, capacity)
    received = _exchange(dispatch_lib.gather_rows(tokens, layout))  # [ep(src) · E/ep · C, D]
    by_expert = received.reshape(ep, e_local, capacity, hidden).swapaxes(0, 1)
    out = apply_experts(by_expert.reshape(-1, hidden), gate_up, down, self.kernel,
                        chunks=self.chunks, gather=_gather_weights)
    out = out.reshape(e_local, ep, capacity, hidden).swapaxes(0, 1).reshape(-1, hidden)
    return dispatch_lib.combine(_exchange(out), layout, combine_weights), layout.dropped_fraction

  def _dropless_local(self, tokens, expert_index, combine_weights, gate_up, down):
    n, k = expert_index.shape
    ep, e_local = self.ep, self.local_experts
    per_peer = n * min(k, e_local)
    destination = expert_index // e_local
    send_layout = dispatch_lib.capacity_layout(destination, ep, per_peer)
    # Each row travels with its expert's local id; e_local marks an empty padding row.
    slot_expert = jnp.append((expert_index % e_local).T.reshape(-1), e_local)
    rows = dispatch_lib.gather_rows(tokens, send_layout)
    row_expert = slot_expert[send_layout.row_slot]
    there, back = self._exchanges(destination, ep)
    received = there(rows, 0)  # [ep · per_peer, D]
    received_expert = there(row_expert, e_local)  # [ep · per_peer]

    layout = dispatch_lib.dropless_layout(
        received_expert[:, None], e_local,
        dispatch_lib.dropless_block_size(self.block_size, n * k, e_local))
    out = apply_experts(dispatch_lib.gather_rows(received, layout), gate_up, down, self.kernel,
                        layout, self.chunks, _gather_weights)
    out = dispatch_lib.combine(out, layout, jnp.ones((received.shape[0], 1), out.dtype))
    return (dispatch_lib.combine(back(out), send_layout, combine_weights),
            jnp.zeros((), jnp.float32))
