"""The Mixtral decoder: embeddings → N × [RMSNorm → GQA attention → RMSNorm → MoE] → RMSNorm → LM head."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax.sharding import Mesh

from mixtral_jax import config as config_lib
from mixtral_jax.model.attention import Attention
from mixtral_jax.model.layers import RMSNorm, kernel_init
from mixtral_jax.model.moe import MoE, MoEStats
from mixtral_jax.parallel import sharding


class DecoderBlock(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then h + moe(norm(h)); `cache_size` > 0
  decodes against a KV cache of that many entries (sampling)."""
  config: ml_collections.FrozenConfigDict
  mesh: Optional[Mesh] = None
  cache_size: int = 0

  @nn.compact
  def __call__(self, x, positions, segment_ids, token_mask, deterministic: bool):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = RMSNorm(cfg.rms_norm_eps, dtype, name="input_norm")(x)
    h = Attention(cfg, self.mesh, name="attention")(h, positions, segment_ids, self.cache_size)
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
               deterministic: bool = True, return_hidden: bool = False, cache_size: int = 0):
    """tokens [B, T] → (logits [B, T, V] float32, MoEStats with a leading [L] layer axis).

    `return_hidden` returns the LM head's input [B, T, D] instead of logits, for a loss that
    applies the head itself (loss.chunked_cross_entropy with params["lm_head"]["kernel"]).

    `positions` restart at 0 for each packed document and `segment_ids` keep attention inside
    one; both default to a single document per row. `token_mask` [B, T] excludes padding from
    the router statistics. `cache_size` > 0 decodes against a KV cache of that many entries in
    the mutable "cache" collection (mixtral_jax/tools/sample.py).
    """
    cfg = self.config
    config_lib.require_resolved(cfg, "the model")
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
    block = (nn.remat(DecoderBlock, static_argnums=(5,), prevent_cse=not cfg.scan_layers)
             if cfg.remat and not cache_size else DecoderBlock)
    if cfg.scan_layers:  # one traced block; parameters stacked on a leading [L] "layers" axis
      layers = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                       split_rngs={"params": True, "jitter": True},
                       in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x, stacked = layers(cfg, self.mesh, cache_size, name="layers")(
          x, positions, segment_ids, token_mask, deterministic)
    else:
      layer_stats = []
      for i in range(cfg.num_layers):
        x, stats = block(cfg, self.mesh, cache_size, name=f"layer_{i}")(
            x, positions, segment_ids, token_mask, deterministic)
        layer_stats.append(stats)
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_stats)
    x = RMSNorm(cfg.rms_norm_eps, dtype, name="final_norm")(x)
    if return_hidden:
      return x, MoEStats(*stacked)
    logits = nn.DenseGeneral(
        cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "vocab")),
        name="lm_head")(x)
    return logits.astype(jnp.float32), MoEStats(*stacked)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled parameters (`layer_0` … `layer_{L-1}`) → the `scan_layers` layout (`layers`, each
  leaf [L, …])."""
  blocks = [params[f"layer_{i}"] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
  # Host (numpy) arrays stay on the host, e.g. an HF import's.
  stack = lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)
  return {**rest, "layers": jax.tree.map(stack, *blocks)}


def unstack_layers(params: dict) -> dict:
  """The `scan_layers` layout → unrolled parameters (unchanged if already unrolled)."""
  if "layers" not in params:
    return params
  rest = {k: v for k, v in params.items() if k != "layers"}
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  return {**rest, **{f"layer_{i}": jax.tree.map(lambda x: x[i], params["layers"])
                     for i in range(num_layers)}}


def _router(params: dict, layer: str) -> dict:
  return params[layer]["moe"]["router"]


def router_bias(params: dict) -> jax.Array:
  """The aux-loss-free selection biases of every layer, [L, E] (router_balance != "aux_loss")."""
  if "layers" in params:
    return _router(params, "layers")["bias"]
  layers = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))
  return jnp.stack([_router(params, layer)["bias"] for layer in layers])


def with_router_bias(params: dict, bias: jax.Array) -> dict:
  """`params` with the selection biases set to `bias` [L, E] (nothing else copied)."""
  def replaced(layer: str, value) -> dict:
    block = params[layer]
    router = {**block["moe"]["router"], "bias": value}
    return {**block, "moe": {**block["moe"], "router": router}}
  if "layers" in params:
    return {**params, "layers": replaced("layers", bias)}
  return {**params, **{f"layer_{i}": replaced(f"layer_{i}", bias[i])
                       for i in range(bias.shape[0])}}


def count_params(params, model_config) -> tuple[int, int]:
  """(total, active per token) parameter counts; active counts k of the E experts per layer."""
  total = sum(x.size for x in jax.tree.leaves(params))
  expert = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
               if any(getattr(p, "key", None) == "experts" for p in path))
  active = total - expert + expert * model_config.experts_per_token // model_config.num_experts
  return total, active
