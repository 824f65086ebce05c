"""The sparse MoE feed-forward: route → dispatch into a grouped buffer → experts → combine."""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mixtral_jax import dispatch as dispatch_lib
from mixtral_jax import router as router_lib
from mixtral_jax.expert_parallel import expert_parallel_moe
from mixtral_jax.experts import ExpertWeights, apply_experts


class MoEStats(NamedTuple):
  aux_loss: jax.Array  # [] load-balancing loss of this layer
  z_loss: jax.Array  # [] router z-loss of this layer
  expert_load: jax.Array  # [E] fraction of token-slots routed to each expert
  mean_probability: jax.Array  # [E] mean router probability of each expert
  dropped_fraction: jax.Array  # [] fraction of slots dropped for lack of capacity


def local_moe(tokens, routing: router_lib.Routing, gate_up, down, *, dispatch: str,
              capacity_factor: float, block_size: int, matmul: str):
  """MoE over tokens [N, D] on one device → (out [N, D], dropped fraction)."""
  num_experts = gate_up.shape[0]
  num_tokens, k = routing.expert_index.shape
  if dispatch == "capacity":
    capacity = dispatch_lib.expert_capacity(num_tokens, num_experts, k, capacity_factor)
    layout = dispatch_lib.capacity_layout(routing.expert_index, num_experts, capacity)
    matmul = "batched"
  else:
    # Blocks larger than a balanced group only add padding.
    balanced = -(-num_tokens * k // num_experts)
    layout = dispatch_lib.dropless_layout(routing.expert_index, num_experts,
                                          max(1, min(block_size, balanced)))
  rows = apply_experts(dispatch_lib.gather_rows(tokens, layout), gate_up, down, matmul, layout)
  return dispatch_lib.combine(rows, layout, routing.combine_weights), layout.dropped_fraction


class MoE(nn.Module):
  """Top-k routed mixture of SwiGLU experts over the flattened batch of tokens.

  With a multi-device `mesh`, experts are split over its `expert` axis and tokens travel to
  them by all-to-all (see expert_parallel.py); router statistics always cover the global batch.
  """
  num_experts: int
  experts_per_token: int
  intermediate_size: int
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  block_size: int = 256
  grouped_matmul: str = "blocked"
  router_jitter_noise: float = 0.0
  dtype: jnp.dtype = jnp.float32
  mesh: Optional[Mesh] = None
  all_to_all: str = "padded"

  @nn.compact
  def __call__(self, x, token_mask: Optional[jax.Array] = None, deterministic: bool = True):
    batch, length, hidden = x.shape  # [B, T, D]
    tokens = x.reshape(-1, hidden)  # [N, D]
    flat_mask = None if token_mask is None else token_mask.reshape(-1)
    routing = router_lib.Router(self.num_experts, self.experts_per_token,
                                self.router_jitter_noise, name="router")(tokens, deterministic)
    gate_up, down = ExpertWeights(self.num_experts, hidden, self.intermediate_size, self.dtype,
                                  name="experts")()
    options = dict(dispatch=self.dispatch, capacity_factor=self.capacity_factor,
                   block_size=self.block_size, matmul=self.grouped_matmul)
    if self.mesh is not None and self.mesh.size > 1:
      out, dropped = expert_parallel_moe(tokens.astype(self.dtype), routing.expert_index,
                                         routing.combine_weights, gate_up, down,
                                         mesh=self.mesh, all_to_all=self.all_to_all, **options)
    else:
      out, dropped = local_moe(tokens, routing, gate_up, down, **options)
    # Outside shard_map, these means run over the global batch.
    stats = MoEStats(
        aux_loss=router_lib.load_balancing_loss(routing, flat_mask),
        z_loss=router_lib.z_loss(routing.logits, flat_mask),
        expert_load=router_lib.expert_load(routing.expert_index, self.num_experts, flat_mask),
        mean_probability=router_lib.mean_probability(routing, flat_mask),
        dropped_fraction=dropped)
    return out.reshape(batch, length, hidden).astype(x.dtype), stats
