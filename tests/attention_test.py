"""Attention: the splash (Pallas, interpret mode here) and dot-product kernels equal the
query-blocked reference, values and gradients, with packed segments and a sliding window."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mixtral_jax import config as config_lib
from mixtral_jax.model import attention
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.parallel import sharding

# 200 positions: not a multiple of splash's 128-row blocks, so its padding is exercised.
BATCH, LENGTH, KV_HEADS, GROUPS, HEAD_DIM = 2, 200, 2, 2, 32
# Row 0 packs two documents and ends in padding (segment 0); row 1 is one document.
SEGMENT_IDS = jnp.array([[1] * 70 + [2] * 90 + [0] * 40, [1] * LENGTH])


def _inputs():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (BATCH, LENGTH, KV_HEADS, GROUPS, HEAD_DIM)) * HEAD_DIM ** -0.5
  k, v = (jax.random.normal(key, (BATCH, LENGTH, KV_HEADS, HEAD_DIM)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)
  return (q, k, v), cotangent


@pytest.mark.parametrize("kernel", ["splash", "dot_product"])
@pytest.mark.parametrize("sliding_window", [0, 48])
def test_kernel_equals_the_reference_values_and_gradients(kernel, sliding_window):
  (q, k, v), cotangent = _inputs()
  reference = lambda q, k, v: attention.causal_attention(q, k, v, SEGMENT_IDS, sliding_window)
  if kernel == "splash":
    fn = lambda q, k, v: attention.splash_attention(q, k, v, SEGMENT_IDS, sliding_window,
                                                    interpret=True)
  else:
    fn = lambda q, k, v: attention.dot_product_attention(q, k, v, SEGMENT_IDS, sliding_window)
  out_ref, vjp_ref = jax.vjp(jax.jit(reference), q, k, v)
  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  for grad, grad_ref in zip(vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-4)
  # The mask matters: a window or a document boundary changes what the last rows see.
  unmasked = attention.causal_attention(q, k, v, jnp.ones_like(SEGMENT_IDS), 0)
  assert not np.allclose(out[0, 150:160], unmasked[0, 150:160], atol=1e-3)


@pytest.mark.slow  # fast: splash equals the reference
def test_splash_on_a_mesh_in_the_model_equals_the_blocked_attention():
  """Through the model on 8 devices, heads split over `tensor`: the shard_map'd kernel."""
  model = default.get_config().model
  model.update(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=4,
               num_kv_heads=2, head_dim=16, num_experts=4, block_size=8, sliding_window=40)
  mesh_config = default.get_config().mesh
  mesh_config.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:8])
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 128), 0, 64)
  segment_ids = jnp.where(jnp.arange(128) < 50, 1, 2) * jnp.ones((4, 1), jnp.int32)
  blocked = Mixtral(config_lib.model_config(model, "cpu"), mesh)
  model.attention = "splash"
  splash = Mixtral(config_lib.model_config(model, "cpu"), mesh)
  params = nn.unbox(blocked.init(jax.random.PRNGKey(0), tokens))["params"]
  params = jax.tree.map(lambda p: p * 5.0 if p.ndim > 1 else p, params)
  loss = lambda module: jax.jit(jax.value_and_grad(lambda p: jnp.mean(jax.nn.log_softmax(
      module.apply({"params": p}, tokens, None, segment_ids)[0])[..., 0])))
  l_blocked, g_blocked = loss(blocked)(params)
  l_splash, g_splash = loss(splash)(params)
  np.testing.assert_allclose(l_splash, l_blocked, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               g_splash, g_blocked)


def test_auto_picks_the_kernel_and_the_loss_chunk_per_backend():
  model = default.get_config().model
  picked = {p: config_lib.model_config(model, p) for p in ("cpu", "tpu", "gpu")}
  assert [picked[p].attention for p in ("cpu", "tpu", "gpu")] == ["blocked", "splash",
                                                                  "dot_product"]
  assert picked["cpu"].loss_chunk_tokens == 512
  # vocab 8000: 2^26 / 8000 = 8388 logits rows fit 256 MiB; the power of two below is 8192.
  assert picked["tpu"].loss_chunk_tokens == picked["gpu"].loss_chunk_tokens == 8192
  model.update(attention="flash")
  with pytest.raises(config_lib.ConfigError, match="model.attention: unknown attention 'flash'"):
    config_lib.validate_model(model)
  config = default.get_config()
  config.model.attention = "splash"
  config_lib.validate(config, 1, "tpu")
  with pytest.raises(config_lib.ConfigError, match="'splash' is a TPU kernel"):
    config_lib.validate(config, 1, "gpu")
