"""Grouped matmuls: rows of a buffer, grouped by expert, times that expert's weight matrix.

- `blocked_swiglu`: rows come in blocks that each belong to one group; a loop runs a whole
  SwiGLU expert (two dense matmuls and the activation) per *used* block and skips the padded
  tail. On CPU this is the fast path, where `jax.lax.ragged_dot` lowers to a masked dense dot
  (G× the FLOPs); one loop for the whole expert keeps each block's activations in cache
  between its matmuls.
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


def _split_gate_up(gate_up, inter: int):
  """[B, 2I] → (gate, up) [B, I] each, in float32."""
  gate_up = gate_up.astype(jnp.float32).reshape(-1, 2, inter)
  return gate_up[:, 0], gate_up[:, 1]


def _swiglu_block(x, gate_up, down, dtype):
  """One block through one expert → (gate_up pre-activations [B, 2I], output [B, D])."""
  inter = down.shape[0]
  pre = jnp.dot(x, gate_up, preferred_element_type=jnp.float32).astype(dtype)
  gate, up = _split_gate_up(pre, inter)
  h = (jax.nn.silu(gate) * up).astype(dtype)
  return pre, jnp.dot(h, down, preferred_element_type=jnp.float32).astype(dtype)


def _blocked_swiglu_forward(x, gate_up, down, block_group, num_active_blocks):
  def body(i, carry):
    pre, out = carry
    g = block_group[i]
    pre_i, out_i = _swiglu_block(x[i], gate_up[g], down[g], x.dtype)
    return pre.at[i].set(pre_i), out.at[i].set(out_i)

  refs = (x, gate_up, down, block_group, num_active_blocks)
  init = (_zeros(x.shape[:2] + gate_up.shape[2:], x.dtype, *refs),
          _zeros(x.shape, x.dtype, *refs))
  return jax.lax.fori_loop(0, num_active_blocks, body, init)  # [nb, B, 2I], [nb, B, D]


@jax.custom_vjp
def blocked_swiglu(x, gate_up, down, block_group, num_active_blocks):
  """SwiGLU experts on blocks: silu(x[i] W1) * (x[i] W3) @ W2 with block i's expert's weights.

  x [nb, B, D]; gate_up [G, D, 2I] (W1 and W3 side by side); down [G, I, D]; block_group [nb].
  Blocks i >= num_active_blocks are skipped and give zeros. Each block runs both matmuls and
  the activation while its rows are in cache, and the backward pass does the same per block.
  """
  return _blocked_swiglu_forward(x, gate_up, down, block_group, num_active_blocks)[1]


def _blocked_swiglu_fwd(x, gate_up, down, block_group, num_active_blocks):
  pre, out = _blocked_swiglu_forward(x, gate_up, down, block_group, num_active_blocks)
  return out, (x, gate_up, down, block_group, num_active_blocks, pre)


def _blocked_swiglu_bwd(residuals, dy):
  x, gate_up, down, block_group, num_active_blocks, pre = residuals
  inter = down.shape[1]

  def body(i, carry):
    dx, dgate_up, ddown = carry
    g = block_group[i]
    gate, up = _split_gate_up(pre[i], inter)
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    h = (silu * up).astype(x.dtype)
    dh = jnp.dot(dy[i], down[g].T, preferred_element_type=jnp.float32)  # [B, I]
    # d silu(g) / dg = sigmoid(g) · (1 + g · (1 − sigmoid(g))).
    dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    dpre = jnp.stack([dgate, dh * silu], axis=1).reshape(dh.shape[0], -1).astype(x.dtype)
    dx = dx.at[i].set(
        jnp.dot(dpre, gate_up[g].T, preferred_element_type=jnp.float32).astype(dx.dtype))
    # Weight gradients accumulate in float32 across the blocks of a group.
    add = lambda acc, update: jax.lax.dynamic_update_index_in_dim(
        acc, jax.lax.dynamic_index_in_dim(acc, g, keepdims=False) + update, g, 0)
    dgate_up = add(dgate_up, jnp.dot(x[i].T, dpre, preferred_element_type=jnp.float32))
    ddown = add(ddown, jnp.dot(h.T, dy[i], preferred_element_type=jnp.float32))
    return dx, dgate_up, ddown

  refs = (x, gate_up, down, dy, block_group, num_active_blocks)
  init = (_zeros(x.shape, x.dtype, *refs), _zeros(gate_up.shape, jnp.float32, *refs),
          _zeros(down.shape, jnp.float32, *refs))
  dx, dgate_up, ddown = jax.lax.fori_loop(0, num_active_blocks, body, init)
  return (_typed_like(dx, x), _typed_like(dgate_up.astype(gate_up.dtype), gate_up),
          _typed_like(ddown.astype(down.dtype), down), None, None)


blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def ragged_matmul(x, w, group_sizes):
  """x [R, K] with consecutive groups of `group_sizes` rows; rows past their sum give zeros.

  The result comes in x's dtype straight from the kernel (which accumulates in float32 on
  GPU/TPU): asked for float32 and cast after, XLA:TPU's grouped-matmul kernel writes the whole
  float32 result to HBM first (+6 GiB per chip for 8x7B at 32k tokens per chip).
  """
  return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=x.dtype)


def batched_matmul(x, w):
  """x [G, C, K] @ w [G, K, N] → [G, C, N]."""
  return jnp.einsum("gck,gkn->gcn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
