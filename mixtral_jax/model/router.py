"""Top-k token router and its auxiliary losses (Switch load balancing, ST-MoE z-loss)."""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixtral_jax.model.layers import kernel_init


class Routing(NamedTuple):
  logits: jax.Array  # [T, E] float32
  expert_index: jax.Array  # [T, k] int32, highest logit first
  combine_weights: jax.Array  # [T, k] float32, softmax over the k selected logits


def top_k_routing(logits, experts_per_token: int) -> Routing:
  """Selects the top-k experts per token; weights = softmax over the selected logits.

  This equals softmax over all experts → top-k → renormalise (HF Mixtral), with fewer exps.
  """
  top_logits, expert_index = jax.lax.top_k(logits, experts_per_token)
  return Routing(logits, expert_index.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1))


def biased_top_k_routing(logits, bias, experts_per_token: int) -> Routing:
  """Aux-loss-free routing (DeepSeek-V3): the top-k of the probabilities plus `bias` [E] are
  selected, and weighted by their unbiased probabilities, renormalised over the k.

  The bias steers only which experts are chosen; it takes no gradient (see step.py for its
  update). With a zero bias this selects as `top_k_routing` does.
  """
  probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
  _, expert_index = jax.lax.top_k(probs + jax.lax.stop_gradient(bias), experts_per_token)
  chosen = jnp.take_along_axis(probs, expert_index, axis=-1)  # [T, k]
  return Routing(logits, expert_index.astype(jnp.int32),
                 chosen / jnp.sum(chosen, axis=-1, keepdims=True))


def _masked_mean(x, token_mask, axis=0):
  if token_mask is None:
    return jnp.mean(x, axis=axis)
  weights = token_mask.reshape(token_mask.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
  return jnp.sum(x * weights, axis=axis) / jnp.maximum(jnp.sum(token_mask), 1)


def expert_load(expert_index, num_experts: int, token_mask: Optional[jax.Array] = None):
  """Fraction of token-slots each expert received, [E], summing to 1."""
  per_token = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=1)  # [T, E]
  return _masked_mean(per_token, token_mask) / expert_index.shape[1]


def mean_probability(routing: Routing, token_mask: Optional[jax.Array] = None):
  """Mean router probability of each expert over tokens, [E]."""
  return _masked_mean(jax.nn.softmax(routing.logits, axis=-1), token_mask)


def load_balancing_loss(routing: Routing, num_experts: int,
                        token_mask: Optional[jax.Array] = None):
  """Switch-style loss E · Σ_e f_e · P_e, with f_e the fraction of tokens sending a slot to e.

  f_e sums to k over experts (HF transformers' convention), so perfectly balanced routing gives k.
  """
  k = routing.expert_index.shape[1]
  tokens_per_expert = expert_load(routing.expert_index, num_experts, token_mask) * k  # [E]
  return num_experts * jnp.sum(tokens_per_expert * mean_probability(routing, token_mask))


def mean_entropy(logits, token_mask: Optional[jax.Array] = None):
  """Mean over tokens of the entropy of softmax(logits), in nats: log E is a router that has
  not chosen yet, 0 one that is certain."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return _masked_mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1), token_mask)


def z_loss(logits, token_mask: Optional[jax.Array] = None):
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)²."""
  return _masked_mean(jax.nn.logsumexp(logits, axis=-1) ** 2, token_mask)


class Router(nn.Module):
  """Linear router; logits in float32 whatever the compute dtype. With `selection_bias`, a
  per-expert `bias` (no gradient) shifts the selection (`biased_top_k_routing`)."""
  num_experts: int
  experts_per_token: int
  jitter_noise: float = 0.0
  selection_bias: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool) -> Routing:  # x [T, D]
    kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init, ("embed", "exp_router")),
                        (x.shape[-1], self.num_experts), jnp.float32)
    x = x.astype(jnp.float32)
    if self.jitter_noise > 0 and not deterministic:
      # Switch Transformer jitter: perturbs only what the router sees, not the experts' input.
      noise = jax.random.uniform(self.make_rng("jitter"), x.shape, jnp.float32,
                                 1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
      x = x * noise
    if self.selection_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ("exp_router",)),
                        (self.num_experts,), jnp.float32)
      return biased_top_k_routing(x @ kernel, bias, self.experts_per_token)
    return top_k_routing(x @ kernel, self.experts_per_token)
