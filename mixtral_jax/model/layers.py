"""Small building blocks shared by the decoder: RMSNorm, rotary position embeddings, padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp

# Mixtral's initializer_range: every matrix starts as N(0, 0.02²).
kernel_init = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
  """RMSNorm with fp32 statistics, then `weight * x` in the compute dtype (as HF Mixtral)."""
  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., D]
    weight = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return weight.astype(self.dtype) * normed.astype(self.dtype)


def apply_rope(x, positions, theta: float):
  """Rotates `x` [B, T, N, H] by `positions` [B, T] with the half-split layout of HF `rotate_half`."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))  # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def pad_length(x, pad: int, value=0):
  """x [B, T, …] with `pad` positions of `value` appended to T."""
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
