"""Reference implementations for tests and benchmarks only; never a product path.

`dense_moe` runs every expert on every token and masks by the routing weights: simple enough to
trust, E/k times the FLOPs of real dispatch. It routes by HF Mixtral's recipe written out on its
own (softmax over all experts → top-k → renormalise), not through router.py, so that a routing
bug there shows as a difference.
"""

import jax
import jax.numpy as jnp

from mixtral_jax.model.experts import swiglu


def routing_weights(logits, experts_per_token: int):
  """[N, E] weight of each expert for each token: its probability if among the token's k most
  probable experts, renormalised over those k; 0 otherwise."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [N, E]
  kth = jnp.sort(probs, axis=-1)[:, -experts_per_token][:, None]  # the k-th largest
  chosen = jnp.where(probs >= kth, probs, 0.0)
  return chosen / jnp.sum(chosen, axis=-1, keepdims=True)


def dense_moe(moe_params, x, experts_per_token: int):
  """Output [B, T, D] of an MoE layer (as `moe.MoE` params) computed densely over all experts."""
  batch, length, hidden = x.shape
  tokens = x.reshape(-1, hidden).astype(jnp.float32)
  weights = routing_weights(tokens @ moe_params["router"]["kernel"], experts_per_token)
  experts = moe_params["experts"]
  h = swiglu(jnp.einsum("nd,edci->enci", tokens, experts["gate_up"]))  # [E, N, I]
  y = jnp.einsum("eni,eid->end", h, experts["down"])  # [E, N, D]
  return jnp.einsum("end,ne->nd", y, weights).reshape(batch, length, hidden)


def dense_swiglu(params, x):
  """A dense SwiGLU FFN with `gate_up` [D, 2, I] and `down` [I, D]: the active-FLOPs baseline."""
  return swiglu(jnp.einsum("btd,dci->btci", x, params["gate_up"])) @ params["down"]
