"""The sparse MoE feed-forward: route → dispatch into a grouped buffer → experts → combine."""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixtral_jax import dispatch as dispatch_lib
from mixtral_jax import router as router_lib
from mixtral_jax.experts import SwiGLUExperts


class MoEStats(NamedTuple):
  aux_loss: jax.Array  # [] load-balancing loss of this layer
  z_loss: jax.Array  # [] router z-loss of this layer
  expert_load: jax.Array  # [E] fraction of token-slots routed to each expert
  dropped_fraction: jax.Array  # [] fraction of slots dropped for lack of capacity


class MoE(nn.Module):
  """Top-k routed mixture of SwiGLU experts over the flattened batch of tokens."""
  num_experts: int
  experts_per_token: int
  intermediate_size: int
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  block_size: int = 128
  grouped_matmul: str = "blocked"
  router_jitter_noise: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, token_mask: Optional[jax.Array] = None, deterministic: bool = True):
    batch, length, hidden = x.shape  # [B, T, D]
    tokens = x.reshape(-1, hidden)  # [N, D]
    flat_mask = None if token_mask is None else token_mask.reshape(-1)
    routing = router_lib.Router(self.num_experts, self.experts_per_token,
                                self.router_jitter_noise, name="router")(tokens, deterministic)
    if self.dispatch == "capacity":
      capacity = dispatch_lib.expert_capacity(tokens.shape[0], self.num_experts,
                                              self.experts_per_token, self.capacity_factor)
      layout = dispatch_lib.capacity_layout(routing.expert_index, self.num_experts, capacity)
    else:
      # Blocks larger than a balanced group only add padding.
      balanced = -(-tokens.shape[0] * self.experts_per_token // self.num_experts)
      block_size = max(1, min(self.block_size, balanced))
      layout = dispatch_lib.dropless_layout(routing.expert_index, self.num_experts, block_size)
    rows = dispatch_lib.gather_rows(tokens, layout)  # [R, D]
    rows = SwiGLUExperts(self.num_experts, self.intermediate_size, self.grouped_matmul,
                         self.dtype, name="experts")(rows, layout, self.dispatch)
    out = dispatch_lib.combine(rows, layout, routing.combine_weights)  # [N, D]
    stats = MoEStats(
        aux_loss=router_lib.load_balancing_loss(routing, flat_mask),
        z_loss=router_lib.z_loss(routing.logits, flat_mask),
        expert_load=router_lib.expert_load(routing.expert_index, self.num_experts, flat_mask),
        dropped_fraction=layout.dropped_fraction)
    return out.reshape(batch, length, hidden).astype(x.dtype), stats
