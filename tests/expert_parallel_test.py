"""Expert parallelism on 8 simulated CPU devices: equal to one device, sharded as designed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mixtral_jax import config as config_lib
from mixtral_jax.model import router
from mixtral_jax.model.expert_parallel import ExpertParallelDispatcher
from mixtral_jax.model.mixtral import router_bias
from mixtral_jax.parallel import sharding
from mixtral_jax.runtime.hlo_stats import all_to_all_bytes
from mixtral_jax.training import build
from mixtral_jax.training import step as step_lib

MESHES = [(1, 1, 8, 1), (2, 1, 4, 1), (2, 2, 2, 1), (1, 2, 2, 2)]


def tiny_config(mesh_shape=(1, 1, 1, 1), dispatch="dropless", capacity_factor=8.0):
  config = default.get_config()
  config.update(global_batch_size=8, seq_len=16, warmup_steps=2, num_train_steps=20,
                learning_rate=3e-3)
  config.model.update(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, num_experts=8, block_size=8,
                      dispatch=dispatch, capacity_factor=capacity_factor)
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  return config


def batches(num, config):
  # Tokens from 8 of the 64 ids: learnable in a few steps, so the loss curve moves.
  tokens = jax.random.randint(jax.random.PRNGKey(7), (num, config.global_batch_size,
                                                       config.seq_len + 1), 0, 8)
  return [{"inputs": t[:, :-1], "targets": t[:, 1:],
           "weights": jnp.ones(t[:, 1:].shape, jnp.float32)} for t in tokens]


def run(config, devices, num_steps):
  """(loss, metrics, grads) of the first batch and the losses of `num_steps` train steps."""
  setup = build.build(config, devices)
  data = [jax.device_put(b, setup.batch_sharding) for b in batches(num_steps, config)]
  loss_fn = step_lib.make_loss_fn(setup.model)
  state = setup.state
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      state.params, data[0], jax.random.PRNGKey(0))
  losses = []
  for batch in data:
    state, step_metrics = setup.train_step(state, batch)
    losses.append(float(step_metrics["loss"]))
  return loss, metrics, grads, losses


_single_device_runs = {}


def single_device_run(dispatch):
  if dispatch not in _single_device_runs:
    _single_device_runs[dispatch] = run(tiny_config(dispatch=dispatch), jax.devices()[:1], 20)
  return _single_device_runs[dispatch]


# Dropless on every mesh; capacity (the same exchange with fixed-size buffers) on pure expert
# parallelism and on the mesh that also splits fsdp and tensor; there too the experts' width in
# 3 slices, each gathered from its FSDP shards (ragged_dot and capacity's batched matmul).
@pytest.mark.parametrize("mesh_shape,dispatch,model",
                         [(mesh, "dropless", {}) for mesh in MESHES] +
                         [(MESHES[0], "capacity", {}), (MESHES[3], "capacity", {}),
                          (MESHES[3], "capacity", {"expert_mlp_chunks": 3}),
                          (MESHES[3], "dropless", {"expert_mlp_chunks": 3,
                                                   "grouped_matmul": "ragged_dot"})])
def test_expert_parallel_equals_single_device(mesh_shape, dispatch, model):
  loss1, metrics1, grads1, losses1 = single_device_run(dispatch)
  config = tiny_config(mesh_shape, dispatch)
  config.model.update(model)
  loss8, metrics8, grads8, losses8 = run(config, jax.devices(), 20)
  if dispatch == "capacity":  # counted per shard (dropless reports a constant 0)
    assert float(metrics8["dropped_fraction"]) == float(metrics1["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  np.testing.assert_allclose(metrics8["aux_loss"], metrics1["aux_loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics8["z_loss"], metrics1["z_loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics8["expert_load"], metrics1["expert_load"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads8,
               grads1)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
  assert losses8[-1] < losses8[0]


def test_aux_free_balancing_on_an_expert_parallel_mesh_equals_one_device():
  # The bias is replicated and updated from the global load: every device holds the same one,
  # and it equals the one-device run's.
  finals = []
  for mesh_shape, devices in (((1, 1, 1, 1), jax.devices()[:1]), ((2, 1, 4, 1), jax.devices())):
    config = tiny_config(mesh_shape)
    config.model.update(router_balance="aux_free", router_bias_rate=0.01)
    setup = build.build(config, devices)
    state, losses = setup.state, []
    for batch in batches(10, config):
      state, metrics = setup.train_step(state, jax.device_put(batch, setup.batch_sharding))
      losses.append(float(metrics["loss"]))
    finals.append((losses, router_bias(state.params)))
  (losses1, bias1), (losses8, bias8) = finals
  np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
  assert bias8.sharding.is_fully_replicated and np.abs(np.asarray(bias1)).max() > 0
  np.testing.assert_allclose(bias8, bias1, atol=1e-7)


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4, 1), (1, 1, 8, 1), (1, 2, 2, 2)])
def test_each_device_holds_its_share_of_experts(mesh_shape):
  config = tiny_config(mesh_shape)
  state = build.build(config).state
  ep, fsdp, tensor = mesh_shape[2], mesh_shape[1], mesh_shape[3]
  e, d, i = 8, 32, 48
  moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
             if hasattr(s, "mu")]
  assert moments, "AdamW moments not found"
  for layer in ("layer_0", "layer_1"):
    trees = [state.params] + [m.mu for m in moments] + [m.nu for m in moments]
    for tree in trees:
      experts = tree[layer]["moe"]["experts"]
      for name, full, local in (("gate_up", (e, d, 2, i), (e // ep, d // fsdp, 2, i // tensor)),
                                ("down", (e, i, d), (e // ep, i // tensor, d // fsdp))):
        assert experts[name].shape == full
        assert {s.data.shape for s in experts[name].addressable_shards} == {local}


@pytest.mark.parametrize("dispatch,per_layer", [("capacity", 4), ("dropless", 5)])
def test_all_to_all_count_and_bytes(dispatch, per_layer):
  config = tiny_config((1, 1, 8, 1), dispatch, capacity_factor=1.0)
  setup = build.build(config, abstract=True)
  hlo = setup.train_step.lower(setup.abstract_state, batches(1, config)[0]).compile().as_text()
  sizes = all_to_all_bytes(hlo)
  # Forward: tokens out and results back (dropless also sends each row's expert id);
  # backward: the transposes of the two float exchanges.
  assert len(sizes) == per_layer * config.model.num_layers
  n, k, e, hidden = 8 * 16 // 8, 2, 8, 32  # local tokens, choices, experts (1 per device)
  if dispatch == "capacity":
    rows = e * -(-n * k // e)  # E · C with C = ceil(1.0 · n · k / E)
    expected = {rows * hidden * 4}
  else:
    rows = 8 * n * min(k, 1)  # per peer: n · min(k, E/ep)
    expected = {rows * hidden * 4, rows * 4}
  assert set(sizes) == expected


@pytest.mark.parametrize("mesh,field", [
    (dict(data=2, fsdp=1, expert=2, tensor=1), "config.mesh:"),
    (dict(data=-1, fsdp=1, expert=3, tensor=1), "config.mesh.data:"),
    (dict(data=1, fsdp=1, expert=-1, tensor=1), None),
    (dict(data=1, fsdp=1, expert=8, tensor=1), None),
    (dict(data=1, fsdp=2, expert=1, tensor=4), "config.model.num_kv_heads:"),
    (dict(data=8, fsdp=1, expert=1, tensor=1), None),
])
def test_mesh_config_errors_name_the_field(mesh, field):
  config = tiny_config()
  config.mesh.update(mesh)
  if field is None:
    config_lib.validate(config, 8)
  else:
    with pytest.raises(config_lib.ConfigError, match=f"^{field}"):
      config_lib.validate(config, 8)


def test_experts_and_batch_divisibility_errors():
  config = tiny_config((1, 1, 8, 1))
  config.model.num_experts = 4
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.num_experts: 4 is not "
                                                   r"divisible by mesh\.expert=8"):
    config_lib.validate(config, 8)
  config = tiny_config((8, 1, 1, 1))
  config.global_batch_size = 12
  with pytest.raises(config_lib.ConfigError, match=r"^config\.global_batch_size: 12"):
    config_lib.validate(config, 8)
  config = tiny_config((1, 2, 2, 2))  # intermediate 48: 24 per tensor shard
  config.model.expert_mlp_chunks = 5
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.expert_mlp_chunks: 5 does "
                                                   r"not divide the experts' width per tensor"):
    config_lib.validate(config, 8)
  config.model.expert_mlp_chunks = 0
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.expert_mlp_chunks: must be "
                                                   r"a positive integer"):
    config_lib.validate(config, 8)


def test_ragged_all_to_all_lowers_forward_and_backward():
  # XLA:CPU cannot compile ragged-all-to-all; lowering checks the program's structure here.
  config = tiny_config((2, 1, 4, 1))
  config.model.all_to_all = "ragged"
  setup = build.build(config, abstract=True)  # abstract: not checked against this backend
  text = setup.train_step.lower(setup.abstract_state, batches(1, config)[0]).as_text()
  # Per layer: rows and expert ids out, results back; the two float transposes backward.
  assert text.count("@ragged_all_to_all(") == 5 * config.model.num_layers


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="ragged_all_to_all needs GPU/TPU")
def test_ragged_all_to_all_equals_padded_on_accelerator():
  # Calls the shard_map MoE directly, so that even one GPU (expert axis of 1) runs the
  # ragged collective; with more devices the exchange really crosses them.
  devices = jax.devices()
  config = tiny_config((1, 1, len(devices), 1))
  config.model.update(grouped_matmul="ragged_dot", capacity_factor=1.0)
  mesh = sharding.make_mesh(config.mesh, devices)
  e, k, d, i, n = 8, 2, 32, 48, 16 * len(devices)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  tokens = jax.random.normal(keys[0], (n, d))
  routing = router.top_k_routing(jax.random.normal(keys[1], (n, e)), k)
  gate_up = jax.random.normal(keys[2], (e, d, 2, i)) * 0.2
  down = jax.random.normal(keys[3], (e, i, d)) * 0.2

  def loss(all_to_all):
    config.model.all_to_all = all_to_all
    model_config = config_lib.model_config(config.model, devices[0].platform)

    def f(tokens, weights, gate_up, down):
      out, _ = ExpertParallelDispatcher(model_config, mesh)(
          tokens, routing._replace(combine_weights=weights), gate_up, down)
      return jnp.sum(jnp.sin(out))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))

  args = (tokens, routing.combine_weights, gate_up, down)
  (value_p, grads_p), (value_r, grads_r) = loss("padded")(*args), loss("ragged")(*args)
  np.testing.assert_allclose(value_r, value_p, rtol=1e-5)
  for a, b in zip(grads_r, grads_p):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ragged_all_to_all_config_errors():
  config = tiny_config((1, 1, 8, 1), dispatch="capacity")
  config.model.all_to_all = "ragged"
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.all_to_all: 'ragged' "
                                                   r"applies to dispatch='dropless'"):
    config_lib.validate(config, 8)
  config.model.dispatch = "dropless"
  config_lib.validate(config, 8, "gpu")
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.all_to_all: 'ragged' "
                                                   r"needs a GPU or TPU"):
    config_lib.validate(config, 8, "cpu")
