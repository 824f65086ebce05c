"""Chunked LM-head cross-entropy equals the full-logits loss, in value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import config as config_lib
from mixtral_jax.training import loss as loss_lib
from mixtral_jax.training import step as step_lib


@pytest.mark.parametrize("chunk_length", [1, 5, 8, 21])
def test_chunked_equals_full_logits(chunk_length):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  hidden = jax.random.normal(keys[0], (3, 21, 16))
  kernel = jax.random.normal(keys[1], (16, 50)) * 0.5
  targets = jax.random.randint(keys[2], (3, 21), 0, 50)
  weights = (jax.random.uniform(keys[3], (3, 21)) > 0.3).astype(jnp.float32)

  def full(h, w):
    return loss_lib.cross_entropy(jnp.einsum("btd,dv->btv", h, w), targets, weights)[0]

  def chunked(h, w):
    return loss_lib.chunked_cross_entropy(h, w, targets, weights, chunk_length)[0]

  expected, expected_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, kernel)
  value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, kernel)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(loss_lib.chunked_cross_entropy(hidden, kernel, targets, weights,
                                              chunk_length)[1]) == float(weights.sum())


def test_train_loss_with_chunked_head_equals_full_logits(tiny_config, build_on_one_device):
  config = tiny_config()
  setup = build_on_one_device(config)
  params = setup.state.params
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 13), 0, config.model.vocab_size)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "weights": jnp.ones((4, 13)).at[:, -3:].set(0.0)}
  results = []
  for chunk_tokens in (0, 20):  # 0: full logits; 20: 5 positions × 4 rows, T padded to 15
    config.model.loss_chunk_tokens = chunk_tokens
    model = setup.model.clone(config=config_lib.model_config(config.model, "cpu"))
    loss_fn = step_lib.make_loss_fn(model)
    results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch, jax.random.PRNGKey(2)))
  (full, full_metrics), full_grads = results[0]
  (chunked, chunked_metrics), chunked_grads = results[1]
  np.testing.assert_allclose(chunked, full, rtol=1e-6)
  np.testing.assert_allclose(chunked_metrics["ce_loss"], full_metrics["ce_loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               chunked_grads, full_grads)
