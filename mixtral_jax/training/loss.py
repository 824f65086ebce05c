"""Language-model cross-entropy, from full logits or chunk by chunk from the LM head's input.

The chunked form never holds the [B, T, V] logits: the LM head is applied to `chunk_length`
positions of every row at a time, and each chunk's gradients (w.r.t. the hidden states and the
head kernel) are computed right there in the forward pass, so the backward pass only scales
them. It removes the largest activation of a small-model step, and the logits are never
written to memory and read back.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from mixtral_jax.model.layers import pad_length


def cross_entropy(logits, targets, weights):
  """(Σ weighted token losses, Σ weights) so micro-batches can be combined exactly."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def _to_chunks(x, chunk_length: int):
  """[B, T, …] → [T / c, B, c, …]: chunks across all rows, so the batch sharding is kept."""
  batch, length = x.shape[:2]
  x = x.reshape((batch, length // chunk_length, chunk_length) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_chunks(x):
  x = jnp.moveaxis(x, 0, 1)  # [B, T / c, c, …]
  return x.reshape((x.shape[0], -1) + x.shape[3:])


def _chunk_loss_and_grads(hidden, kernel, targets, weights):
  """One chunk: Σ weighted CE of hidden [B, c, D] @ kernel [D, V], and its d/dhidden, d/dkernel."""
  logits = jnp.einsum("bcd,dv->bcv", hidden, kernel, preferred_element_type=jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [B, c]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss = jnp.sum((log_normalizer - target_logits) * weights)
  # d loss / d logits = weights · (softmax − one-hot), without building a one-hot matrix.
  probs = jnp.exp(logits - log_normalizer[..., None])
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.bool_)
  dlogits = (jnp.where(one_hot, probs - 1.0, probs) * weights[..., None]).astype(hidden.dtype)
  dhidden = jnp.einsum("bcv,dv->bcd", dlogits, kernel, preferred_element_type=jnp.float32)
  dkernel = jnp.einsum("bcd,bcv->dv", hidden, dlogits, preferred_element_type=jnp.float32)
  return loss, dhidden.astype(hidden.dtype), dkernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_sum(hidden, kernel, targets, weights, chunk_length: int):
  return _chunked_sum_fwd(hidden, kernel, targets, weights, chunk_length)[0]


def _chunked_sum_fwd(hidden, kernel, targets, weights, chunk_length):
  def body(dkernel, chunk):
    chunk_hidden, chunk_targets, chunk_weights = chunk
    loss, dhidden, dkernel_chunk = _chunk_loss_and_grads(chunk_hidden, kernel, chunk_targets,
                                                         chunk_weights)
    return dkernel + dkernel_chunk, (loss, dhidden)

  chunks = tuple(_to_chunks(x, chunk_length) for x in (hidden, targets, weights))
  dkernel, (losses, dhidden) = jax.lax.scan(body, jnp.zeros(kernel.shape, jnp.float32), chunks)
  return jnp.sum(losses), (_from_chunks(dhidden), dkernel.astype(kernel.dtype))


def _chunked_sum_bwd(chunk_length, residuals, g):
  dhidden, dkernel = residuals
  return (g * dhidden).astype(dhidden.dtype), (g * dkernel).astype(dkernel.dtype), None, None


_chunked_sum.defvjp(_chunked_sum_fwd, _chunked_sum_bwd)


def chunked_cross_entropy(hidden, kernel, targets, weights, chunk_length: int):
  """cross_entropy(hidden @ kernel, targets, weights) without materialising the logits.

  hidden [B, T, D], kernel [D, V], targets and weights [B, T]; T is padded (with zero weight)
  to a multiple of `chunk_length`. Differentiable in hidden and kernel.
  """
  pad = -hidden.shape[1] % chunk_length
  if pad:
    hidden, targets, weights = (pad_length(x, pad) for x in (hidden, targets, weights))
  weights = weights.astype(jnp.float32)
  return _chunked_sum(hidden, kernel, targets, weights, chunk_length), jnp.sum(weights)
