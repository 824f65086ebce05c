"""Causal grouped-query attention with RoPE, optional sliding window and packed-segment masking."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mixtral_jax.layers import apply_rope, kernel_init


def attention_mask(positions_q, positions_k, segment_q, segment_k, sliding_window: int):
  """Boolean [B, 1, 1, T, S] mask: causal, same segment, and within the sliding window if > 0."""
  q = positions_q[:, :, None]  # [B, T, 1]
  k = positions_k[:, None, :]  # [B, 1, S]
  mask = k <= q
  if sliding_window > 0:
    mask &= q - k < sliding_window
  mask &= segment_q[:, :, None] == segment_k[:, None, :]
  return mask[:, None, None]


def causal_attention(q, k, v, segment_ids, sliding_window: int = 0, query_chunk: int = 0):
  """Masked softmax attention; q [B, T, K, G, H] (pre-scaled), k, v [B, T, K, H] → like q.

  With `query_chunk` > 0 the queries go in blocks of that many, each scored only against the
  keys it can see (up to its last query, from its first query's window start): causal masking
  then skips about half the score FLOPs and memory instead of computing and discarding them.
  """
  batch, length = q.shape[:2]
  chunk = query_chunk or length
  order = jnp.broadcast_to(jnp.arange(length), (batch, length))
  outputs = []
  for start in range(0, length, chunk):
    end = min(start + chunk, length)
    first = max(0, start - sliding_window + 1) if sliding_window > 0 else 0
    scores = jnp.einsum("btkgh,bskh->bkgts", q[:, start:end], k[:, first:end],
                        preferred_element_type=jnp.float32)  # [B, K, G, c, s]
    # Sequence order, not `positions`, is causal order: packed documents restart positions.
    mask = attention_mask(order[:, start:end], order[:, first:end], segment_ids[:, start:end],
                          segment_ids[:, first:end], sliding_window)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    outputs.append(jnp.einsum("bkgts,bskh->btkgh", probs, v[:, first:end]))
  return jnp.concatenate(outputs, axis=1)


class Attention(nn.Module):
  """GQA: `num_heads` query heads share `num_kv_heads` key/value heads in equal groups.

  `config` is the model config (see config.model_config).
  """
  config: ml_collections.FrozenConfigDict

  def _proj(self, x, heads: int, name: str):
    return nn.DenseGeneral(
        (heads, self.config.head_dim), use_bias=False, dtype=jnp.dtype(self.config.dtype),
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "heads", "kv")),
        name=name)(x)

  @nn.compact
  def __call__(self, x, positions, segment_ids):  # x [B, T, D]; positions, segment_ids [B, T]
    cfg = self.config
    batch, length, _ = x.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = apply_rope(self._proj(x, cfg.num_heads, "q_proj"), positions, cfg.rope_theta)
    k = apply_rope(self._proj(x, cfg.num_kv_heads, "k_proj"), positions, cfg.rope_theta)
    v = self._proj(x, cfg.num_kv_heads, "v_proj")  # [B, T, K, H]
    q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)  # [B, T, K, G, H]
    q = q * jnp.asarray(cfg.head_dim ** -0.5, q.dtype)
    out = causal_attention(q, k, v, segment_ids, cfg.sliding_window, cfg.attention_query_chunk)
    out = out.reshape(batch, length, cfg.num_heads, cfg.head_dim)
    return nn.DenseGeneral(
        x.shape[-1], axis=(-2, -1), use_bias=False, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("heads", "kv", "embed")),
        name="o_proj")(out)
