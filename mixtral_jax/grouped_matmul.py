"""Grouped matmuls: rows of a buffer, grouped by expert, times that expert's weight matrix.

- `blocked_matmul`: rows come in blocks that each belong to one group; a loop runs one dense
  matmul per *used* block and skips the padded tail. Measured on CPU it runs at batched-einsum
  speed, where `jax.lax.ragged_dot` lowers to a masked dense dot (G× the FLOPs).
- `ragged_matmul`: `jax.lax.ragged_dot`, the native grouped matmul on GPU/TPU.
- `batched_matmul`: every group has the same number of rows (the capacity buffer).
"""

import jax
import jax.numpy as jnp


def _zeros(shape, dtype, *like):
  """Zeros typed as varying over the same shard_map axes as `like`.

  Inside shard_map a loop carry must keep its type, and the body's results vary wherever its
  inputs do; deriving the zeros from the inputs (without using their values) matches that.
  """
  zero = jnp.zeros((), dtype)
  for ref in like:
    zero = jnp.where(False, ref.reshape(-1)[0].astype(dtype), zero)
  return jnp.broadcast_to(zero, shape)


def _varying_axes(x) -> frozenset:
  manual = getattr(jax.typeof(x), "manual_axis_type", None)
  return manual.varying if manual is not None else frozenset()


def _typed_like(cotangent, primal):
  """Gives a cotangent the shard_map axis type of its primal.

  A primal replicated over an axis that its cotangent varies over (weights shared by the data
  shards) gets the sum over that axis: the same reduction JAX inserts for non-custom rules.
  """
  extra = _varying_axes(cotangent) - _varying_axes(primal)
  if extra:
    cotangent = jax.lax.psum(cotangent, tuple(sorted(extra)))
  missing = _varying_axes(primal) - _varying_axes(cotangent)
  if missing:
    cotangent = jax.lax.pcast(cotangent, tuple(sorted(missing)), to="varying")
  return cotangent


def _blocked_forward(x, w, block_group, num_active_blocks):
  def body(i, out):
    y = jnp.dot(x[i], w[block_group[i]], preferred_element_type=jnp.float32)
    return out.at[i].set(y.astype(out.dtype))
  out = _zeros(x.shape[:2] + w.shape[2:], x.dtype, x, w, block_group, num_active_blocks)
  return jax.lax.fori_loop(0, num_active_blocks, body, out)  # [nb, B, N]


@jax.custom_vjp
def blocked_matmul(x, w, block_group, num_active_blocks):
  """x [nb, B, K] @ w[block_group[i]] [K, N] for blocks i < num_active_blocks; others are 0."""
  return _blocked_forward(x, w, block_group, num_active_blocks)


def _blocked_fwd(x, w, block_group, num_active_blocks):
  return _blocked_forward(x, w, block_group, num_active_blocks), (x, w, block_group,
                                                                  num_active_blocks)


def _blocked_bwd(residuals, dy):
  x, w, block_group, num_active_blocks = residuals

  def body(i, carry):
    dx, dw = carry
    g = block_group[i]
    dx = dx.at[i].set(jnp.dot(dy[i], w[g].T, preferred_element_type=jnp.float32).astype(dx.dtype))
    # Accumulate weight gradients in float32 across the blocks of a group.
    dw_g = jax.lax.dynamic_index_in_dim(dw, g, keepdims=False)
    dw_g = dw_g + jnp.dot(x[i].T, dy[i], preferred_element_type=jnp.float32)
    return dx, jax.lax.dynamic_update_index_in_dim(dw, dw_g, g, 0)

  refs = (x, w, dy, block_group, num_active_blocks)
  init = (_zeros(x.shape, x.dtype, *refs), _zeros(w.shape, jnp.float32, *refs))
  dx, dw = jax.lax.fori_loop(0, num_active_blocks, body, init)
  return _typed_like(dx, x), _typed_like(dw.astype(w.dtype), w), None, None


blocked_matmul.defvjp(_blocked_fwd, _blocked_bwd)


def ragged_matmul(x, w, group_sizes):
  """x [R, K] with consecutive groups of `group_sizes` rows; rows past their sum give zeros."""
  return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)


def batched_matmul(x, w):
  """x [G, C, K] @ w [G, K, N] → [G, C, N]."""
  return jnp.einsum("gck,gkn->gcn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
