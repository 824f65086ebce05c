"""Causal grouped-query attention with RoPE, optional sliding window and packed-segment masking.

Three implementations of one mask (`model.attention`; "auto" picks per backend, see
config.model_config): the query-blocked XLA attention below (CPU), Pallas splash attention
(TPU; Pallas interpret mode on CPU, for tests) and `jax.nn.dot_product_attention` (GPU, cuDNN's
fused kernel for half-precision inputs).
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh

from mixtral_jax.model.layers import apply_rope, kernel_init, pad_length
from mixtral_jax.parallel import sharding

# Splash block sizes tried in order; the sequence is padded to a multiple of the smallest.
_SPLASH_BLOCKS = (512, 256, 128)


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


def _splash_kernel(heads: int, length: int, sliding_window: int, interpret: bool):
  """The splash kernel for one sequence: q [heads, length, H], k, v [kv heads, length, H]."""
  block = next(b for b in _SPLASH_BLOCKS if length % b == 0)
  shape = (length, length)
  # A left window of w - 1 with no right side is causal and sees w keys, the query's included.
  mask = (splash.LocalMask(shape, (sliding_window - 1, 0), offset=0) if sliding_window > 0
          else splash.CausalMask(shape))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids, sliding_window: int = 0,
                     mesh: Optional[Mesh] = None, interpret: bool = False):
  """causal_attention's result from the Pallas TPU splash kernel (`interpret` runs it on CPU).

  The kernel skips blocks the mask leaves empty. With `mesh` it runs per device in shard_map
  (rows over the batch axes, heads over `tensor`), as XLA cannot partition a Pallas call.
  """
  batch, length, kv_heads, groups, head_dim = q.shape
  q = q.reshape(batch, length, kv_heads * groups, head_dim)  # [B, T, N, H]
  pad = -length % _SPLASH_BLOCKS[-1]
  if pad:  # padding is its own segment (-1; real ids are >= 0), so no real token sees it
    q, k, v = (pad_length(x, pad) for x in (q, k, v))
    segment_ids = pad_length(segment_ids, pad, -1)

  def per_device(q, k, v, segment_ids):  # [b, T, n, H], [b, T]
    kernel = _splash_kernel(q.shape[2], q.shape[1], sliding_window, interpret)
    one_row = lambda q, k, v, s: kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                                        segment_ids=splash.SegmentIds(s, s)).swapaxes(0, 1)
    return jax.vmap(one_row)(q, k, v, segment_ids)

  if mesh is not None:
    heads = sharding.logical_to_spec(("batch", "length", "heads", "kv"))
    rows = sharding.logical_to_spec(("batch", "length"))
    # check_vma off: a Pallas call's outputs carry no varying-axes type.
    per_device = jax.shard_map(per_device, mesh=mesh, in_specs=(heads, heads, heads, rows),
                               out_specs=heads, check_vma=False)
  out = per_device(q, k, v, segment_ids)[:, :length]
  return out.reshape(batch, length, kv_heads, groups, head_dim)


def dot_product_attention(q, k, v, segment_ids, sliding_window: int = 0,
                          implementation: Optional[str] = None):
  """causal_attention's result from `jax.nn.dot_product_attention` ("cudnn": the fused kernel)."""
  batch, length, kv_heads, groups, head_dim = q.shape
  same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
  out = jax.nn.dot_product_attention(
      q.reshape(batch, length, kv_heads * groups, head_dim), k, v, mask=same_segment, scale=1.0,
      is_causal=True, local_window_size=(sliding_window - 1, 0) if sliding_window > 0 else None,
      implementation=implementation)
  return out.reshape(q.shape)


def _platform(mesh: Optional[Mesh]) -> str:
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


class Attention(nn.Module):
  """GQA: `num_heads` query heads share `num_kv_heads` key/value heads in equal groups.

  `config` is the model config (see config.model_config); `mesh` as in model.Mixtral.
  """
  config: ml_collections.FrozenConfigDict
  mesh: Optional[Mesh] = None

  def _proj(self, x, heads: int, name: str):
    return nn.DenseGeneral(
        (heads, self.config.head_dim), use_bias=False, dtype=jnp.dtype(self.config.dtype),
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "heads", "kv")),
        name=name)(x)

  def _decode(self, q, k, v, positions, segment_ids, cache_size: int):
    """Attention against the "cache" collection's keys and values (sampling): a prompt
    (T > 1, the cache empty) attends to itself and leaves its last `cache_size` entries
    there; a new token (T = 1) is written at the next slot and attends to every cached entry
    it can see. Slots are used in turn, so a cache of `sliding_window` entries is a rolling
    buffer. A position < 0 marks padding: never attended to."""
    cfg = self.config
    batch, length, kv_heads, head_dim = k.shape
    # Stored [B, K, S, H]: both products of a decode step then read the cache as it lies.
    shape = (batch, kv_heads, cache_size, head_dim)
    keys = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
    values = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
    cached_positions = self.variable("cache", "position", lambda: jnp.full(
        (batch, cache_size), -1, jnp.int32))
    written = self.variable("cache", "written", lambda: jnp.zeros((), jnp.int32))
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, K, T, H]
    if length > 1:  # the prompt; its padding (position < 0) is its own segment
      out = causal_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), segment_ids,
                             cfg.sliding_window, cfg.attention_query_chunk)
      kept = min(length, cache_size)
      slots = (length - kept + jnp.arange(kept)) % cache_size  # where a rolling buffer has them
      keys.value = keys.value.at[:, :, slots].set(k[:, :, length - kept:])
      values.value = values.value.at[:, :, slots].set(v[:, :, length - kept:])
      cached_positions.value = cached_positions.value.at[:, slots].set(
          positions[:, length - kept:].astype(jnp.int32))
      written.value = jnp.asarray(length, jnp.int32)
      return out
    slot = written.value % cache_size
    keys.value = jax.lax.dynamic_update_slice_in_dim(keys.value, k, slot, axis=2)
    values.value = jax.lax.dynamic_update_slice_in_dim(values.value, v, slot, axis=2)
    cached_positions.value = jax.lax.dynamic_update_slice_in_dim(
        cached_positions.value, positions.astype(jnp.int32), slot, axis=1)
    written.value = written.value + 1
    seen = cached_positions.value  # [B, S]
    query = positions[:, :1]  # [B, 1]
    mask = (seen >= 0) & (seen <= query)
    if cfg.sliding_window > 0:
      mask &= query - seen < cfg.sliding_window
    scores = jnp.einsum("bkgh,bksh->bkgs", q[:, 0], keys.value,
                        preferred_element_type=jnp.float32)  # [B, K, G, S]
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.value.dtype)
    return jnp.einsum("bkgs,bksh->bkgh", probs, values.value)[:, None]  # [B, 1, K, G, H]

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache_size: int = 0):
    """x [B, T, D]; positions, segment_ids [B, T]. `cache_size` > 0: decode against a KV cache
    of that many entries (see _decode)."""
    cfg = self.config
    batch, length, _ = x.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = apply_rope(self._proj(x, cfg.num_heads, "q_proj"), positions, cfg.rope_theta)
    k = apply_rope(self._proj(x, cfg.num_kv_heads, "k_proj"), positions, cfg.rope_theta)
    v = self._proj(x, cfg.num_kv_heads, "v_proj")  # [B, T, K, H]
    q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)  # [B, T, K, G, H]
    q = q * jnp.asarray(cfg.head_dim ** -0.5, q.dtype)
    platform = _platform(self.mesh)
    if cache_size:
      out = self._decode(q, k, v, positions, segment_ids, cache_size)
    elif cfg.attention == "splash":
      out = splash_attention(q, k, v, segment_ids, cfg.sliding_window, self.mesh,
                             interpret=platform == "cpu")
    elif cfg.attention == "dot_product":
      # cuDNN's fused attention takes half precision only; XLA's otherwise.
      fused = platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
      out = dot_product_attention(q, k, v, segment_ids, cfg.sliding_window,
                                  "cudnn" if fused else None)
    else:
      out = causal_attention(q, k, v, segment_ids, cfg.sliding_window, cfg.attention_query_chunk)
    out = out.reshape(batch, length, cfg.num_heads, cfg.head_dim)
    return nn.DenseGeneral(
        x.shape[-1], axis=(-2, -1), use_bias=False, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("heads", "kv", "embed")),
        name="o_proj")(out)
