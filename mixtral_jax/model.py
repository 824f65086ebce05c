"""The Mixtral decoder: embeddings → N × [RMSNorm → GQA attention → RMSNorm → MoE] → RMSNorm → LM head."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jax.sharding import Mesh

from mixtral_jax import sharding
from mixtral_jax.attention import Attention
from mixtral_jax.layers import RMSNorm, kernel_init
from mixtral_jax.moe import MoE, MoEStats


class DecoderBlock(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then h + moe(norm(h))."""
  config: ml_collections.FrozenConfigDict
  mesh: Optional[Mesh] = None

  @nn.compact
  def __call__(self, x, positions, segment_ids, token_mask, deterministic: bool):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = RMSNorm(cfg.rms_norm_eps, dtype, name="input_norm")(x)
    h = Attention(cfg, name="attention")(h, positions, segment_ids)
    x = x + h
    h = RMSNorm(cfg.rms_norm_eps, dtype, name="post_attention_norm")(x)
    h, stats = MoE(cfg, self.mesh, name="moe")(h, token_mask, deterministic)
    x = sharding.constrain(x + h, ("batch", "length", "act_embed"), self.mesh)
    return x, stats


class Mixtral(nn.Module):
  """Mixtral-style sparse MoE language model; `config` is `config.model_config(config.model, …)`.

  `mesh` (optional) places activations and runs the MoE expert-parallel over its axes.
  """
  config: ml_collections.FrozenConfigDict
  mesh: Optional[Mesh] = None

  @nn.compact
  def __call__(self, tokens, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, token_mask: Optional[jax.Array] = None,
               deterministic: bool = True, return_hidden: bool = False):
    """tokens [B, T] → (logits [B, T, V] float32, MoEStats with a leading [L] layer axis).

    `return_hidden` returns the LM head's input [B, T, D] instead of logits, for a loss that
    applies the head itself (loss.chunked_cross_entropy with params["lm_head"]["kernel"]).

    `positions` restart at 0 for each packed document and `segment_ids` keep attention inside
    one; both default to a single document per row. `token_mask` [B, T] excludes padding from
    the router statistics.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.zeros_like(tokens)
    embed = self.param("embed", nn.with_logical_partitioning(kernel_init, ("vocab", "embed")),
                       (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    x = embed.astype(dtype)[tokens]  # [B, T, D]
    x = sharding.constrain(x, ("batch", "length", "act_embed"), self.mesh)

    # `deterministic` (argument 5, counting the module) is a Python bool: static under remat.
    block = nn.remat(DecoderBlock, static_argnums=(5,)) if cfg.remat else DecoderBlock
    layer_stats = []
    for i in range(cfg.num_layers):
      x, stats = block(cfg, self.mesh, name=f"layer_{i}")(x, positions, segment_ids, token_mask,
                                               deterministic)
      layer_stats.append(stats)
    x = RMSNorm(cfg.rms_norm_eps, dtype, name="final_norm")(x)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_stats)
    if return_hidden:
      return x, MoEStats(*stacked)
    logits = nn.DenseGeneral(
        cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "vocab")),
        name="lm_head")(x)
    return logits.astype(jnp.float32), MoEStats(*stacked)


def count_params(params, model_config) -> tuple[int, int]:
  """(total, active per token) parameter counts; active counts k of the E experts per layer."""
  total = sum(x.size for x in jax.tree.leaves(params))
  expert = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
               if any(getattr(p, "key", None) == "experts" for p in path))
  active = total - expert + expert * model_config.experts_per_token // model_config.num_experts
  return total, active
