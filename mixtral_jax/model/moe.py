"""The sparse MoE feed-forward: route → dispatch into a grouped buffer → experts → combine."""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mixtral_jax.model import router as router_lib
from mixtral_jax.model.dispatchers import make_dispatcher
from mixtral_jax.model.experts import ExpertWeights


class MoEStats(NamedTuple):
  aux_loss: jax.Array  # [] load-balancing loss of this layer
  z_loss: jax.Array  # [] router z-loss of this layer
  expert_load: jax.Array  # [E] fraction of token-slots routed to each expert
  mean_probability: jax.Array  # [E] mean router probability of each expert
  dropped_fraction: jax.Array  # [] fraction of slots dropped for lack of capacity
  router_entropy: jax.Array  # [] mean entropy of the router's distribution over experts (nats)


class MoE(nn.Module):
  """Top-k routed mixture of SwiGLU experts over the flattened batch of tokens.

  `config` is the model config (see config.model_config); it and `mesh` choose the dispatcher
  (dispatchers.py): on a multi-device mesh, experts are split over its `expert` axis and tokens
  travel to them by all-to-all. Router statistics always cover the global batch.
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
                                cfg.router_balance != "aux_loss", name="router")(
                                    tokens, deterministic)
    gate_up, down = ExpertWeights(cfg.num_experts, hidden, cfg.intermediate_size,
                                  jnp.dtype(cfg.dtype), name="experts")()
    out, dropped = make_dispatcher(cfg, self.mesh)(tokens, routing, gate_up, down)
    # Outside shard_map, these means run over the global batch.
    stats = MoEStats(
        aux_loss=router_lib.load_balancing_loss(routing, cfg.num_experts, flat_mask),
        z_loss=router_lib.z_loss(routing.logits, flat_mask),
        expert_load=router_lib.expert_load(routing.expert_index, cfg.num_experts, flat_mask),
        mean_probability=router_lib.mean_probability(routing, flat_mask),
        dropped_fraction=dropped,
        router_entropy=router_lib.mean_entropy(routing.logits, flat_mask))
    return out.reshape(batch, length, hidden).astype(x.dtype), stats
