"""Dispatch: every sparse path equals the dense every-expert oracle, forward and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mixtral_jax import config as config_lib
from mixtral_jax.model import dispatch
from mixtral_jax.model import grouped_matmul
from mixtral_jax.model import oracle
from mixtral_jax.model.experts import swiglu
from mixtral_jax.model.moe import MoE

NUM_EXPERTS, K, HIDDEN, INTER = 8, 2, 32, 48


def moe_and_params(dispatch_mode, gmm="blocked", capacity_factor=8.0, block_size=16, seed=0,
                   chunks=1):
  model = default.get_config().model
  model.update(num_experts=NUM_EXPERTS, experts_per_token=K, intermediate_size=INTER,
               dispatch=dispatch_mode, capacity_factor=capacity_factor, block_size=block_size,
               grouped_matmul=gmm, expert_mlp_chunks=chunks)
  module = MoE(config_lib.model_config(model, "cpu"))
  x = jax.random.normal(jax.random.PRNGKey(seed), (3, 40, HIDDEN))
  params = nn.unbox(module.init(jax.random.PRNGKey(seed + 1), x))["params"]
  # Larger than the 0.02 init so outputs and gradients are O(1) and the tolerance means something.
  params = jax.tree.map(lambda p: p * 10.0, params)
  return module, params, x


# chunks: the experts' width in 3 slices (expert_mlp_chunks), each path.
@pytest.mark.parametrize("dispatch_mode,gmm,chunks", [("dropless", "blocked", 1),
                                                      ("dropless", "ragged_dot", 1),
                                                      ("capacity", "blocked", 1),
                                                      ("dropless", "blocked", 3),
                                                      ("dropless", "ragged_dot", 3),
                                                      ("capacity", "blocked", 3)])
def test_dispatch_matches_dense_oracle(dispatch_mode, gmm, chunks):
  module, params, x = moe_and_params(dispatch_mode, gmm, chunks=chunks)
  sparse = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
  dense = jax.jit(lambda p, x: oracle.dense_moe(p, x, K))
  np.testing.assert_allclose(sparse(params, x), dense(params, x), atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(dense(params, x)).mean()) > 0.1  # the comparison is not of near-zeros

  objective = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  sparse_grads = jax.grad(objective(sparse), argnums=(0, 1))(params, x)
  dense_grads = jax.grad(objective(dense), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               sparse_grads, dense_grads)


def test_large_capacity_equals_dropless():
  capacity_module, params, x = moe_and_params("capacity", capacity_factor=float(NUM_EXPERTS))
  dropless_module, _, _ = moe_and_params("dropless")
  out_c, stats_c = capacity_module.apply({"params": params}, x)
  out_d, stats_d = dropless_module.apply({"params": params}, x)
  np.testing.assert_allclose(out_c, out_d, atol=1e-5)
  assert float(stats_c.dropped_fraction) == 0.0  # capacity E·T·k/E: room for every slot


def test_capacity_drops_exactly_the_overflow():
  # 8 tokens, 2 experts, k=2, factor 0.5 → capacity ceil(0.5·8·2/2) = 4 rows per expert.
  first = [0, 0, 0, 0, 0, 1, 1, 0]
  expert_index = jnp.array([[e, 1 - e] for e in first], jnp.int32)
  capacity = dispatch.expert_capacity(8, 2, 2, 0.5)
  assert capacity == 4
  layout = dispatch.capacity_layout(expert_index, 2, capacity)
  # First choices come first: expert 0 keeps tokens 0..3 of its 6 first choices, expert 1 keeps
  # its 2 first choices (tokens 5, 6) and then the second choices of tokens 0, 1.
  kept = np.asarray(layout.slot_row < 2 * capacity).reshape(2, 8)  # [choice, token]
  np.testing.assert_array_equal(kept[0], [1, 1, 1, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(kept[1], [1, 1, 0, 0, 0, 0, 0, 0])
  assert float(layout.dropped_fraction) == pytest.approx(8 / 16)


def test_capacity_output_drops_slots_not_tokens():
  module, params, x = moe_and_params("capacity", capacity_factor=0.5)
  out, stats = module.apply({"params": params}, x)
  assert 0.0 < float(stats.dropped_fraction) < 1.0

  tokens = x.reshape(-1, HIDDEN)
  routing = tokens @ params["router"]["kernel"]
  top = jax.lax.top_k(routing, K)
  weights = jax.nn.softmax(top[0], -1)
  # Counted by hand: each expert takes C = ceil(0.5 · T · k / E) slots, all first choices (in
  # token order) before any second choice.
  capacity = int(np.ceil(0.5 * tokens.shape[0] * K / NUM_EXPERTS))
  kept, taken = np.zeros((tokens.shape[0], K), bool), np.zeros(NUM_EXPERTS, int)
  for j in range(K):
    for t in range(tokens.shape[0]):
      e = int(top[1][t, j])
      kept[t, j], taken[e] = taken[e] < capacity, taken[e] + (taken[e] < capacity)
  assert 0 < kept.sum() < kept.size
  expected = np.zeros_like(np.asarray(tokens))
  e_params = params["experts"]
  for t in range(tokens.shape[0]):
    for j in range(K):
      if kept[t, j]:
        e = int(top[1][t, j])
        h = swiglu(jnp.einsum("d,dci->ci", tokens[t], e_params["gate_up"][e]))
        expected[t] += float(weights[t, j]) * np.asarray(h @ e_params["down"][e])
  np.testing.assert_allclose(out.reshape(-1, HIDDEN), expected, atol=1e-4, rtol=1e-5)
  assert float(stats.dropped_fraction) == pytest.approx(1 - float(kept.mean()))


def test_dropless_layout_groups_blocks_by_expert():
  rng = np.random.default_rng(0)
  expert_index = jnp.asarray(rng.integers(0, 4, size=(50, 2)), jnp.int32)
  block = 8
  layout = dispatch.dropless_layout(expert_index, 4, block)
  rows = np.asarray(layout.slot_row)
  assert len(set(rows.tolist())) == rows.size  # every slot has its own row
  flat_expert = np.asarray(expert_index).T.reshape(-1)
  block_expert = np.asarray(layout.block_expert)
  np.testing.assert_array_equal(block_expert[rows // block], flat_expert)
  counts = np.bincount(flat_expert, minlength=4)
  assert int(layout.num_active_blocks) == int(np.sum(-(-counts // block)))
  np.testing.assert_array_equal(np.asarray(layout.row_slot)[rows], np.arange(100))


def test_dropless_never_drops_under_total_imbalance():
  expert_index = jnp.zeros((64, 2), jnp.int32).at[:, 1].set(1)  # two experts get everything
  layout = dispatch.dropless_layout(expert_index, 8, 16)
  assert float(layout.dropped_fraction) == 0.0
  assert np.all(np.asarray(layout.slot_row) < layout.row_slot.shape[0])


def test_dropless_layout_skips_padding_slots():
  expert_index = jnp.array([[0], [3], [1], [3], [0]], jnp.int32)  # id 3 = padding when E = 3
  layout = dispatch.dropless_layout(expert_index, 3, 2)
  rows = np.asarray(layout.slot_row)
  num_rows = layout.row_slot.shape[0]
  assert rows[1] == rows[3] == num_rows
  np.testing.assert_array_equal(layout.group_sizes, [2, 2, 0])
  assert int(layout.num_active_blocks) == 2
  np.testing.assert_array_equal(np.asarray(layout.block_expert)[rows[[0, 2, 4]] // 2], [0, 1, 0])


@pytest.mark.parametrize("num_active", [0, 3, 5])
def test_blocked_swiglu_matches_per_block_reference(num_active):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(5, 4, 6)), jnp.float32)  # [nb, B, D]
  gate_up = jnp.asarray(rng.normal(size=(3, 6, 2 * 7)), jnp.float32)  # [G, D, 2I]
  down = jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)  # [G, I, D]
  block_group = jnp.array([0, 0, 2, 1, 2], jnp.int32)
  active = jnp.int32(num_active)

  def reference(x, gate_up, down):
    h = swiglu(jnp.einsum("nbd,ndf->nbf", x, gate_up[block_group]).reshape(5, 4, 2, 7))
    y = jnp.einsum("nbi,nid->nbd", h, down[block_group])
    return y * (jnp.arange(5) < num_active)[:, None, None]

  fused = lambda x, gate_up, down: grouped_matmul.blocked_swiglu(x, gate_up, down, block_group,
                                                                 active)
  np.testing.assert_allclose(fused(x, gate_up, down), reference(x, gate_up, down),
                             rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(fused(x, gate_up, down))[num_active:])
  cotangent = jnp.asarray(rng.normal(size=(5, 4, 6)), jnp.float32)
  loss = lambda f: lambda *args: jnp.sum(f(*args) * cotangent)
  got = jax.grad(loss(fused), argnums=(0, 1, 2))(x, gate_up, down)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, gate_up, down)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
  # bfloat16 compute: gradients come back in the weights' dtype and near the float32 ones.
  bf16 = [a.astype(jnp.bfloat16) for a in (x, gate_up, down)]
  got16 = jax.grad(loss(fused), argnums=(0, 1, 2))(*bf16)
  for g, e in zip(got16, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), e, rtol=0.05, atol=0.05 * np.abs(e).max())


def test_capacity_rounds_a_fractional_share_up():
  # 1.25 · 6 tokens · 2 slots / 4 experts = 3.75 rows: GShard's ceil gives 4 (floor, 3).
  assert dispatch.expert_capacity(6, 4, 2, 1.25) == 4
  # Counted by hand: expert 0 gets 4 slots, experts 1 and 2 three each, expert 3 two.
  expert_index = jnp.array([[0, 1], [0, 2], [0, 3], [0, 1], [2, 3], [1, 2]])
  layout = dispatch.capacity_layout(expert_index, 4, dispatch.expert_capacity(6, 4, 2, 1.25))
  assert float(layout.dropped_fraction) == 0.0  # 3 rows would drop one of the 12 slots
  assert int(jnp.sum(layout.slot_row < 4 * 4)) == 12
