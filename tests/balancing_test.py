"""Aux-loss-free load balancing (model.router_balance) and the expert-health metrics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import config as config_lib
from mixtral_jax.cli import convert as convert_cli
from mixtral_jax.model import router
from mixtral_jax.model.mixtral import router_bias, with_router_bias
from mixtral_jax.tools import convert
from mixtral_jax.training import build as build_lib
from mixtral_jax.training import checkpoint
from mixtral_jax.training import loop as train
from mixtral_jax.training import step as step_lib


def test_the_bias_shifts_the_selection_and_not_the_weights():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  p = np.exp([2.0, 1.0, 0.0, -1.0]) / np.exp([2.0, 1.0, 0.0, -1.0]).sum()  # .644 .237 .087 .032
  plain = router.biased_top_k_routing(logits, jnp.zeros(4), 2)
  assert plain.expert_index.tolist() == [[0, 1]]
  np.testing.assert_allclose(plain.combine_weights, [[p[0], p[1]] / (p[0] + p[1])], rtol=1e-6)
  # +0.5 lifts expert 2 (0.087 + 0.5) above expert 1 (0.237): chosen, but weighted by its own
  # probability, renormalised with expert 0's.
  biased = router.biased_top_k_routing(logits, jnp.array([0.0, 0.0, 0.5, 0.0]), 2)
  assert biased.expert_index.tolist() == [[0, 2]]
  np.testing.assert_allclose(biased.combine_weights, [[p[0], p[2]] / (p[0] + p[2])], rtol=1e-6)
  assert biased.logits is logits  # the router's statistics see the unbiased logits


def test_a_zero_bias_routes_as_top_k():
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  plain, biased = router.top_k_routing(logits, 2), router.biased_top_k_routing(
      logits, jnp.zeros(8), 2)
  assert plain.expert_index.tolist() == biased.expert_index.tolist()
  np.testing.assert_allclose(plain.combine_weights, biased.combine_weights, rtol=1e-6)


def test_the_update_moves_each_bias_toward_the_balanced_load():
  load = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
  bias = step_lib.balanced_bias(jnp.zeros((2, 4)), load, 0.01)
  np.testing.assert_array_equal(bias, np.float32([[-0.01, 0.0, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]]))
  health = step_lib.expert_health(load, bias)
  np.testing.assert_allclose(health["max_load_ratio_per_layer"], [2.0, 1.0])
  np.testing.assert_array_equal(health["starved_experts_per_layer"], [1.0, 0.0])
  np.testing.assert_allclose(health["router_bias_range_per_layer"], [0.02, 0.0])
  assert float(health["max_load_ratio"]) == 2.0 and float(health["starved_experts"]) == 1.0


def _uneven(params):
  """`params` whose routers select expert 0 for most tokens: a bias of +0.3 on it, and router
  weights scaled up so that the tokens' probabilities spread (as a trained router's do)."""
  def scale(path, x):
    keys = [getattr(p, "key", None) for p in path]
    return x * 30.0 if keys[-2:] == ["router", "kernel"] else x
  params = jax.tree_util.tree_map_with_path(scale, params)
  return with_router_bias(params, jnp.array([[0.3, 0.0, 0.0, 0.0]] * 2, jnp.float32))


@pytest.mark.parametrize("balance", ["aux_free", "both"])
def test_the_bias_moves_an_uneven_load_toward_balance(tiny_config, build_on_one_device, balance):
  config = tiny_config(learning_rate=1e-6)  # the router's weights barely move: the bias acts
  config.model.update(router_balance=balance, router_bias_rate=0.01)
  setup = build_on_one_device(config)
  state = setup.state.replace(params=_uneven(setup.state.params))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (8, 33), 0, 320)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                          "weights": jnp.ones((8, 32))}, setup.batch_sharding)
  ratios = []
  for _ in range(30):
    state, metrics = setup.train_step(state, batch)
    ratios.append(float(metrics["max_load_ratio"]))
  assert ratios[0] > 1.8, ratios  # expert 0 in nearly every token's top 2 of 4
  assert max(ratios[-5:]) < 1.3, ratios
  bias = np.asarray(router_bias(state.params))
  assert (bias[:, 0] < 0.2).all() and (bias[:, 1:] > 0.1).all(), bias  # 0 down, the rest up


def test_aux_free_drops_the_aux_loss_and_both_keeps_it(tiny_config, build_on_one_device):
  tokens = jax.random.randint(jax.random.PRNGKey(3), (8, 33), 0, 320)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((8, 32))}
  for balance, coef in (("aux_free", 0.0), ("both", 0.02), ("aux_loss", 0.02)):
    config = tiny_config()
    config.model.update(router_balance=balance, router_aux_loss_coef=0.02)
    setup = build_on_one_device(config)
    _, m = setup.train_step(setup.state, jax.device_put(batch, setup.batch_sharding))
    rest = float(m["loss"] - m["ce_loss"] - config.model.router_z_loss_coef * m["z_loss"])
    assert rest == pytest.approx(coef * float(m["aux_loss"]), abs=1e-6), balance
    assert ("router_bias_range_per_layer" in m) == (balance != "aux_loss")


def test_resume_is_bitwise_with_the_bias(tmp_path, tiny_config):
  config = tiny_config(num_train_steps=8, checkpoint_every_steps=0, log_every_steps=1)
  config.model.update(router_balance="aux_free", router_bias_rate=0.01)
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=4)
  train.train_and_evaluate(config, str(tmp_path / "resumed"))

  def records(run):
    return [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
  strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rs]
  assert strip(records("resumed")) == strip(records("straight"))
  setup = build_lib.build(config, abstract=True)
  finals = [setup.restore(checkpoint.Checkpointer(str(tmp_path / run)))[0]
            for run in ("straight", "resumed")]
  biases = [np.asarray(router_bias(state.params)) for state in finals]
  assert np.abs(biases[0]).max() > 0  # it moved
  np.testing.assert_array_equal(biases[0], biases[1])
  jax.tree.map(np.testing.assert_array_equal, finals[0], finals[1])


def test_the_bias_takes_no_gradient_and_no_weight_decay(tiny_config, build_on_one_device):
  config = tiny_config(weight_decay=0.5)
  config.model.update(router_balance="aux_free", router_bias_rate=0.0, scan_layers=True)
  setup = build_on_one_device(config)
  state = setup.state.replace(params=with_router_bias(
      setup.state.params, jnp.full((2, 4), 0.25, jnp.float32)))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (8, 33), 0, 320)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                          "weights": jnp.ones((8, 32))}, setup.batch_sharding)
  for _ in range(3):
    state, _ = setup.train_step(state, batch)
  np.testing.assert_array_equal(router_bias(state.params), np.full((2, 4), 0.25, np.float32))


def test_export_refuses_a_model_with_biased_routing(tmp_path, tiny_config, capsys):
  config = tiny_config(num_train_steps=2, checkpoint_every_steps=0)
  config.model.router_balance = "aux_free"
  run = str(tmp_path / "run")
  train.train_and_evaluate(config, run)
  capsys.readouterr()
  assert convert_cli.main(["to-hf", "--workdir", run, "--out", str(tmp_path / "hf")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: model.router_balance='aux_free': the "
                                             "router selects experts with per-expert biases")
  assert not (tmp_path / "hf").exists()
  with pytest.raises(convert.ConversionError):
    convert.export_hf({}, config.model, str(tmp_path / "hf"))


def test_an_unknown_balancing_is_one_line(tiny_config):
  config = tiny_config()
  config.model.router_balance = "loss_free"
  with pytest.raises(config_lib.ConfigError, match=r"^config.model.router_balance: unknown "):
    config_lib.validate(config)
