"""Router: top-k selection, combine weights and both losses against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.model import router


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("num_experts,k", [(8, 2), (4, 1), (16, 4)])
def test_top_k_and_losses_match_numpy(num_experts, k):
  rng = np.random.default_rng(num_experts * 10 + k)
  logits = rng.normal(size=(64, num_experts)).astype(np.float32) * 2
  routing = router.top_k_routing(jnp.asarray(logits), k)

  # HF Mixtral: softmax over all experts → top-k → renormalise.
  probs = np_softmax(logits.astype(np.float64))
  expected_index = np.argsort(-logits, axis=-1)[:, :k]
  top_probs = np.take_along_axis(probs, expected_index, -1)
  np.testing.assert_array_equal(routing.expert_index, expected_index)
  np.testing.assert_allclose(routing.combine_weights, top_probs / top_probs.sum(-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)

  counts = np.zeros(num_experts)
  np.add.at(counts, expected_index.reshape(-1), 1)
  f = counts / logits.shape[0]  # sums to k
  expected_aux = num_experts * np.sum(f * probs.mean(0))
  np.testing.assert_allclose(router.load_balancing_loss(routing, num_experts), expected_aux,
                             rtol=1e-5)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(router.z_loss(routing.logits), np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(router.expert_load(routing.expert_index, num_experts),
                             counts / counts.sum(), rtol=1e-6)


def test_balanced_routing_gives_aux_loss_k():
  # 4 experts, k=2, equal logits for a token's pair: every expert gets 1/2 of tokens and mean
  # probability 1/4, so aux = E · Σ (k/E) · (1/E) = k.
  logits = np.full((4, 4), -1e4, np.float32)
  for t, (a, b) in enumerate([(0, 1), (2, 3), (1, 2), (3, 0)]):
    logits[t, [a, b]] = 0.0
  routing = router.top_k_routing(jnp.asarray(logits), 2)
  np.testing.assert_allclose(router.load_balancing_loss(routing, 4), 2.0, rtol=1e-6)
  np.testing.assert_allclose(router.expert_load(routing.expert_index, 4), [0.25] * 4)


def test_imbalanced_routing_costs_more_than_balanced():
  logits = np.zeros((8, 4), np.float32)
  logits[:, 0] = 5.0
  logits[:, 1] = 4.0
  routing = router.top_k_routing(jnp.asarray(logits), 2)
  assert float(router.load_balancing_loss(routing, 4)) > 2.0 + 1.0


def test_token_mask_excludes_padding():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(10, 4)).astype(np.float32)
  mask = np.array([1] * 6 + [0] * 4, np.float32)
  full = router.top_k_routing(jnp.asarray(logits[:6]), 2)
  masked = router.top_k_routing(jnp.asarray(logits), 2)
  np.testing.assert_allclose(router.load_balancing_loss(masked, 4, jnp.asarray(mask)),
                             router.load_balancing_loss(full, 4), rtol=1e-6)
  np.testing.assert_allclose(router.z_loss(masked.logits, jnp.asarray(mask)),
                             router.z_loss(full.logits), rtol=1e-6)


def test_jitter_only_in_training_and_reproducible():
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 16))
  module = router.Router(num_experts=8, experts_per_token=2, jitter_noise=0.5)
  params = module.init(jax.random.PRNGKey(1), x, deterministic=True)
  clean = module.apply(params, x, deterministic=True)
  noisy = module.apply(params, x, deterministic=False, rngs={"jitter": jax.random.PRNGKey(2)})
  again = module.apply(params, x, deterministic=False, rngs={"jitter": jax.random.PRNGKey(2)})
  assert not np.allclose(clean.logits, noisy.logits)
  np.testing.assert_array_equal(noisy.logits, again.logits)


def test_mean_entropy_runs_from_undecided_to_certain():
  uniform = jnp.zeros((5, 8))
  np.testing.assert_allclose(router.mean_entropy(uniform), np.log(8), rtol=1e-6)
  certain = jnp.eye(8)[:5] * 100.0
  np.testing.assert_allclose(router.mean_entropy(certain), 0.0, atol=1e-6)
  mask = jnp.array([1, 1, 0, 0, 0])  # masked tokens do not count
  mixed = jnp.concatenate([certain[:2], uniform[:3]])
  np.testing.assert_allclose(router.mean_entropy(mixed, mask), 0.0, atol=1e-6)
