"""Reference implementations for tests and benchmarks only; never a product path.

`dense_moe` runs every expert on every token and masks by the routing weights: simple enough to
trust, E/k times the FLOPs of real dispatch.
"""

import jax
import jax.numpy as jnp

from mixtral_jax.model.experts import swiglu
from mixtral_jax.model.router import top_k_routing


def dense_moe(moe_params, x, experts_per_token: int):
  """Output [B, T, D] of an MoE layer (as `moe.MoE` params) computed densely over all experts."""
  batch, length, hidden = x.shape
  tokens = x.reshape(-1, hidden).astype(jnp.float32)
  routing = top_k_routing(tokens @ moe_params["router"]["kernel"], experts_per_token)
  num_experts = routing.logits.shape[-1]
  weights = jnp.sum(jax.nn.one_hot(routing.expert_index, num_experts) *
                    routing.combine_weights[..., None], axis=1)  # [N, E]
  experts = moe_params["experts"]
  h = swiglu(jnp.einsum("nd,edci->enci", tokens, experts["gate_up"]))  # [E, N, I]
  y = jnp.einsum("eni,eid->end", h, experts["down"])  # [E, N, D]
  return jnp.einsum("end,ne->nd", y, weights).reshape(batch, length, hidden)


def dense_swiglu(params, x):
  """A dense SwiGLU FFN with `gate_up` [D, 2, I] and `down` [I, D]: the active-FLOPs baseline."""
  return swiglu(jnp.einsum("btd,dci->btci", x, params["gate_up"])) @ params["down"]
