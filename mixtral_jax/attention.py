"""Causal grouped-query attention with RoPE, optional sliding window and packed-segment masking."""

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class Attention(nn.Module):
  """GQA: `num_heads` query heads share `num_kv_heads` key/value heads in equal groups."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  sliding_window: int = 0
  dtype: jnp.dtype = jnp.float32

  def _proj(self, x, heads: int, name: str):
    return nn.DenseGeneral(
        (heads, self.head_dim), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "heads", "kv")),
        name=name)(x)

  @nn.compact
  def __call__(self, x, positions, segment_ids):  # x [B, T, D]; positions, segment_ids [B, T]
    batch, length, _ = x.shape
    groups = self.num_heads // self.num_kv_heads
    q = apply_rope(self._proj(x, self.num_heads, "q_proj"), positions, self.rope_theta)
    k = apply_rope(self._proj(x, self.num_kv_heads, "k_proj"), positions, self.rope_theta)
    v = self._proj(x, self.num_kv_heads, "v_proj")  # [B, T, K, H]
    q = q.reshape(batch, length, self.num_kv_heads, groups, self.head_dim)  # [B, T, K, G, H]

    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (self.head_dim ** -0.5)
    # Sequence order, not `positions`, is causal order: packed documents restart positions.
    order = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = attention_mask(order, order, segment_ids, segment_ids, self.sliding_window)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(batch, length, self.num_heads,
                                                             self.head_dim)
    return nn.DenseGeneral(
        x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("heads", "kv", "embed")),
        name="o_proj")(out)
