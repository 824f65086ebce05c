"""The train step runs the config it was built from: no "auto" choice reaches the model or the
loss unresolved, and the default step's loops are the ones its config asks for (the loss in
chunks of 512 tokens per device, not one position at a time)."""

import collections

import jax
import ml_collections
import numpy as np
import pytest

from configs import default, mixtral_8x7b, moe_1b
from mixtral_jax import config as config_lib
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.runtime import hlo_stats
from mixtral_jax.training import step as step_lib


def _scans(jaxpr) -> list[tuple[int, list[tuple[int, ...]]]]:
  """(length, shapes of one iteration's xs) of every scan in `jaxpr` and the jaxprs inside it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      first_x = eqn.params["num_consts"] + eqn.params["num_carry"]
      found.append((eqn.params["length"], [v.aval.shape[1:] for v in eqn.invars[first_x:]]))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
        if isinstance(inner, jax.extend.core.Jaxpr):
          found += _scans(inner)
  return found


@pytest.mark.parametrize("preset", [default, moe_1b, mixtral_8x7b])
@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_no_auto_choice_survives_model_config(preset, platform):
  model = preset.get_config().model
  # Every field that says "auto" in a preset is one model_config resolves.
  autos = {name for name, value in model.items() if value in ("auto", -1)}
  assert autos <= set(config_lib.AUTO_VALUES), autos - set(config_lib.AUTO_VALUES)
  resolved = config_lib.model_config(model, platform)
  config_lib.require_resolved(resolved, "the test")  # raises on an "auto" left
  assert resolved.loss_chunk_tokens > 0


def test_build_gives_the_model_and_step_the_resolved_config(build_on_one_device):
  setup = build_on_one_device(default.get_config(), abstract=True)
  assert setup.model_config is setup.model.config
  assert dict(setup.model_config) == dict(config_lib.model_config(setup.config.model, "cpu"))
  assert setup.config.model.loss_chunk_tokens == -1  # the user's config keeps what they wrote
  assert setup.model_config.loss_chunk_tokens == 512


@pytest.mark.parametrize("field", sorted(config_lib.AUTO_VALUES))
def test_the_model_and_the_loss_refuse_an_unresolved_config(field):
  config = default.get_config()
  config.model.update(vocab_size=64, hidden_size=16, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, num_experts=2)
  raw = config_lib.model_config(config.model, "cpu").as_configdict()
  raw[field] = config_lib.AUTO_VALUES[field]
  model = Mixtral(ml_collections.FrozenConfigDict(raw))
  tokens = np.zeros((1, 8), np.int32)
  message = rf"^config\.model\.{field}: .* reached the model unresolved"
  with pytest.raises(config_lib.ConfigError, match=message):
    model.init(jax.random.PRNGKey(0), tokens)
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.model\.{field}: .* the loss"):
    step_lib.make_loss_fn(model)


def test_the_default_step_computes_the_loss_in_chunks_of_512_tokens(build_on_one_device):
  """rows · seq_len / 512 = 4 loop iterations over [rows, 64, D], as "auto" means on CPU."""
  setup = build_on_one_device(default.get_config(), abstract=True)
  config, model = setup.config, setup.model_config
  jaxpr = jax.make_jaxpr(setup.train_step)(setup.abstract_state, setup.abstract_batch()).jaxpr
  rows, length, hidden = config.global_batch_size, config.seq_len, model.hidden_size
  chunk = 512 // rows
  kinds = []
  for count, shapes in _scans(jaxpr):
    if (rows, length) in shapes:
      kinds.append(("micro-batches", count))
    elif any(len(shape) == 3 and shape[::2] == (rows, hidden) for shape in shapes):
      kinds.append(("loss chunks", count, shapes))
    elif not shapes:  # jnp.searchsorted's halvings: each dropless block's expert
      kinds.append(("search", count))
    else:
      kinds.append(("unexpected", count, shapes))
  expected = ([("micro-batches", config.grad_accum_steps)] +
              [("search", (model.num_experts).bit_length())] * model.num_layers +
              [("loss chunks", rows * length // 512, [(rows, chunk, hidden), (rows, chunk),
                                                       (rows, chunk)])])
  assert sorted(kinds, key=str) == sorted(expected, key=str)


def test_the_compiled_default_step_keeps_only_the_expected_loops(build_on_one_device):
  """The while loops XLA:CPU keeps in the default step, by trip count: the RNG split's threefry
  rounds (5), each layer's search for its blocks' experts (4) and the loss chunks (4); each
  layer's blocked experts, forward and backward, over the blocks the routing fills (known only
  at run time). Any other loop is a change to look at."""
  setup = build_on_one_device(default.get_config(), abstract=True)
  compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch()).compile()
  loops = hlo_stats.while_loops(compiled.as_text())
  layers = setup.model_config.num_layers
  expected = collections.Counter({5: 1, 4: layers + 1, None: 2 * layers})
  assert collections.Counter(count for _, count in loops) == expected, loops
