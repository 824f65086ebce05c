"""The sparse MoE feed-forward: route → dispatch into a grouped buffer → experts → combine."""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
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
  router_entropy: jax.Array  # [] mean entropy of the router's distribution over experts (nats)


def single_device_moe(tokens, routing: router_lib.Routing, gate_up, down,
                      config: ml_collections.FrozenConfigDict):
  """MoE over tokens [N, D] on one device → (out [N, D], dropped fraction)."""
  num_experts = gate_up.shape[0]
  num_tokens, k = routing.expert_index.shape
  if config.dispatch == "capacity":  # equal groups of `capacity` rows: one batched matmul
    capacity = dispatch_lib.expert_capacity(num_tokens, num_experts, k, config.capacity_factor)
    layout = dispatch_lib.capacity_layout(routing.expert_index, num_experts, capacity)
    matmul = "batched"
  else:
    block_size = dispatch_lib.dropless_block_size(config.block_size, num_tokens * k, num_experts)
    layout = dispatch_lib.dropless_layout(routing.expert_index, num_experts, block_size)
    matmul = config.grouped_matmul
  rows = apply_experts(dispatch_lib.gather_rows(tokens, layout), gate_up, down, matmul, layout,
                       config.expert_mlp_chunks)
  return dispatch_lib.combine(rows, layout, routing.combine_weights), layout.dropped_fraction


class MoE(nn.Module):
  """Top-k routed mixture of SwiGLU experts over the flattened batch of tokens.

  `config` is the model config (see config.model_config). With a multi-device `mesh`, experts
  are split over its `expert` axis and tokens travel to them by all-to-all (see
  expert_parallel.py); router statistics always cover the global batch.
  """
  config: ml_collections.FrozenConfigDict
  mesh: Optional[Mesh] = None

  @nn.compact
  def __call__(self, x, token_mask: Optional[jax.Array] = None, deterministic: bool = True):
    cfg = self.config
    batch, length, hidden = x.shape  # [B, T, D]
    tokens = x.reshape(-1, hidden)  # [N, D]
    flat_mask = None if token_mask is None else token_mask.reshape(-1)
    routing = router_lib.Router(cfg.num_experts, cfg.experts_per_token, cfg.router_jitter_noise,
                                name="router")(tokens, deterministic)
    gate_up, down = ExpertWeights(cfg.num_experts, hidden, cfg.intermediate_size,
                                  jnp.dtype(cfg.dtype), name="experts")()
    if self.mesh is not None and self.mesh.size > 1:
      out, dropped = expert_parallel_moe(tokens.astype(jnp.dtype(cfg.dtype)),
                                         routing.expert_index, routing.combine_weights, gate_up,
                                         down, cfg, self.mesh)
    else:
      out, dropped = single_device_moe(tokens, routing, gate_up, down, cfg)
    # Outside shard_map, these means run over the global batch.
    stats = MoEStats(
        aux_loss=router_lib.load_balancing_loss(routing, flat_mask),
        z_loss=router_lib.z_loss(routing.logits, flat_mask),
        expert_load=router_lib.expert_load(routing.expert_index, cfg.num_experts, flat_mask),
        mean_probability=router_lib.mean_probability(routing, flat_mask),
        dropped_fraction=dropped,
        router_entropy=router_lib.mean_entropy(routing.logits, flat_mask))
    return out.reshape(batch, length, hidden).astype(x.dtype), stats
