"""Model: causality, sliding window, packed documents, parameter counts, bf16, remat."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, mixtral_8x7b, moe_1b
from mixtral_jax import config as config_lib
from mixtral_jax.data import packing
from mixtral_jax.model.mixtral import Mixtral, count_params, stack_layers, unstack_layers
from mixtral_jax.tools.convert import export_hf
from mixtral_jax.training import build as build_lib


def tiny_model_config(**overrides):
  model = default.get_config().model
  model.update(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=8, num_experts=4, block_size=8)
  model.update(overrides)
  return model


def init(model_config, tokens, seed=0):
  model = Mixtral(config_lib.model_config(model_config, "cpu"))
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), tokens))["params"]
  # Larger weights than the 0.02 init so differences show up well above float noise.
  params = jax.tree.map(lambda p: p * 5.0 if p.ndim > 1 else p, params)
  return Jitted(model), params


class Jitted:
  """The model with a jitted `apply` (eager op-by-op execution is slow)."""

  def __init__(self, model):
    self.apply = jax.jit(model.apply, static_argnames="deterministic")


@pytest.mark.parametrize("overrides", [dict(dispatch="dropless"),
                                       dict(dispatch="dropless", grouped_matmul="ragged_dot"),
                                       dict(dispatch="capacity", capacity_factor=4.0)])
def test_future_tokens_never_change_past_logits(overrides):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 97)
  model, params = init(tiny_model_config(**overrides), tokens)
  logits, _ = model.apply({"params": params}, tokens)
  for t in (0, 7, 22):
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 13) % 97)
    changed_logits, _ = model.apply({"params": params}, changed)
    np.testing.assert_allclose(changed_logits[:, :t + 1], logits[:, :t + 1], atol=1e-5)
    assert not np.allclose(changed_logits[:, t + 1:], logits[:, t + 1:], atol=1e-3)


def test_sliding_window_limits_what_a_layer_sees():
  window = 4
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 20), 0, 97)
  model, params = init(tiny_model_config(num_layers=1, sliding_window=window), tokens)
  logits, _ = model.apply({"params": params}, tokens)
  t = 15
  # One layer: position t sees t-window+1 .. t, so tokens up to t-window don't matter.
  changed = tokens.at[:, :t - window + 1].set((tokens[:, :t - window + 1] + 5) % 97)
  np.testing.assert_allclose(model.apply({"params": params}, changed)[0][:, t], logits[:, t],
                             atol=1e-5)
  changed = tokens.at[:, t - window + 1].set((tokens[:, t - window + 1] + 5) % 97)
  assert not np.allclose(model.apply({"params": params}, changed)[0][:, t], logits[:, t],
                         atol=1e-3)


def test_packed_rows_equal_documents_run_alone():
  docs = [np.asarray(jax.random.randint(jax.random.PRNGKey(i), (n,), 4, 97))
          for i, n in enumerate([8, 5, 11])]
  stream = packing.Stream(lambda k: docs[k] if k < len(docs) else None, 16, 2, 3)
  batch = packing.stack_rows([stream.next_row() for _ in range(2)])  # doc 3 spans both rows
  model, params = init(tiny_model_config(), batch["inputs"])
  packed, _ = model.apply({"params": params}, batch["inputs"], batch["positions"],
                          batch["segment_ids"], batch["weights"])
  for row in range(2):
    for segment in range(1, batch["segment_ids"][row].max() + 1):
      piece = batch["segment_ids"][row] == segment
      alone, _ = model.apply({"params": params}, batch["inputs"][row][piece][None])
      np.testing.assert_allclose(packed[row][piece], alone[0], atol=1e-5)


@pytest.mark.parametrize("preset,total_count,active_count", [(mixtral_8x7b, 46.7e9, 12.9e9),
                                                            (moe_1b, 1.02e9, 0.34e9)])
def test_preset_parameter_counts(preset, total_count, active_count):
  config = preset.get_config()
  model = Mixtral(config_lib.model_config(config.model, "cpu"))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 1), jnp.int32)))["params"])
  total, active = count_params(shapes, config.model)
  assert total == pytest.approx(total_count, rel=0.01)
  assert active == pytest.approx(active_count, rel=0.01)


def test_bfloat16_and_remat_agree_with_float32():
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 97)
  model32, params = init(tiny_model_config(), tokens)
  model16 = Jitted(Mixtral(config_lib.model_config(tiny_model_config(dtype="bfloat16"), "cpu")))
  remat = Jitted(Mixtral(config_lib.model_config(tiny_model_config(remat=True), "cpu")))
  loss = lambda model: lambda p: jnp.mean(
      jax.nn.log_softmax(model.apply({"params": p}, tokens, deterministic=False)[0])[..., 0])
  l32, g32 = jax.jit(jax.value_and_grad(loss(model32)))(params)
  l16, g16 = jax.jit(jax.value_and_grad(loss(model16)))(params)
  lr, gr = jax.jit(jax.value_and_grad(loss(remat)))(params)
  assert abs(float(l16) - float(l32)) < 0.05 * abs(float(l32))
  # bf16 gradients point the same way as float32's: within 10% in norm, per parameter.
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    assert a.dtype == jnp.float32  # parameters (and so gradients) stay float32
    assert np.linalg.norm(np.asarray(a) - b) <= 0.1 * np.linalg.norm(b) + 1e-6
  np.testing.assert_allclose(lr, l32, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), gr, g32)


def test_query_blocked_attention_equals_one_block():
  # A window of 6 with blocks of 4: later blocks start their keys mid-sequence.
  sliding_window = 6
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 21), 0, 97)
  segment_ids = jnp.array([[1] * 9 + [2] * 12, [1] * 21])
  positions = jnp.where(segment_ids == 2, jnp.arange(21) - 9, jnp.arange(21))
  one_block, params = init(tiny_model_config(sliding_window=sliding_window, num_layers=1,
                                             attention_query_chunk=0), tokens)
  blocked, _ = init(tiny_model_config(sliding_window=sliding_window, num_layers=1,
                                      attention_query_chunk=4), tokens)
  loss = lambda model: lambda p: jnp.mean(jax.nn.log_softmax(
      model.apply({"params": p}, tokens, positions, segment_ids)[0])[..., 0])
  l1, g1 = jax.jit(jax.value_and_grad(loss(one_block)))(params)
  lb, gb = jax.jit(jax.value_and_grad(loss(blocked)))(params)
  np.testing.assert_allclose(lb, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), gb, g1)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_gives_the_unrolled_loss_gradients_and_hf_export(tmp_path, remat):
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 97)
  unrolled = tiny_model_config(remat=remat)
  scanned = tiny_model_config(remat=remat, scan_layers=True)
  model, params = init(unrolled, tokens)
  scan_model = Mixtral(config_lib.model_config(scanned, "cpu"))
  fresh = nn.unbox(scan_model.init(jax.random.PRNGKey(0), tokens))["params"]
  stacked = stack_layers(params, unrolled.num_layers)
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)

  def loss(apply, p):
    logits, stats = apply({"params": p}, tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()
    return ce + stats.aux_loss.mean() + stats.z_loss.mean()

  loss_u, grads_u = jax.jit(jax.value_and_grad(lambda p: loss(model.apply, p)))(params)
  loss_s, grads_s = jax.jit(jax.value_and_grad(lambda p: loss(scan_model.apply, p)))(stacked)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               unstack_layers(grads_s), grads_u)
  export_hf(jax.device_get(stacked), scanned, str(tmp_path / "scanned"))
  export_hf(jax.device_get(params), unrolled, str(tmp_path / "unrolled"))
  names = sorted(os.listdir(tmp_path / "unrolled"))
  assert names == sorted(os.listdir(tmp_path / "scanned")) and names
  for name in names:
    assert (tmp_path / "scanned" / name).read_bytes() == (tmp_path / "unrolled" / name).read_bytes()


def test_scanned_parameters_keep_their_shardings_behind_the_layers_axis():
  config = default.get_config()
  config.model.update(tiny_model_config(scan_layers=True, num_experts=8))
  config.update(global_batch_size=8, seq_len=16)
  config.mesh.update(data=2, expert=4)
  setup = build_lib.build(config, abstract=True)
  experts = setup.abstract_state.params["layers"]["moe"]["experts"]
  assert experts["gate_up"].sharding.spec[:2] == (None, "expert")  # [L, E, …]
  assert experts["gate_up"].shape[:2] == (config.model.num_layers, 8)
