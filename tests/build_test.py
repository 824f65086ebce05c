"""build: one program per config; abstract builds allocate nothing; shardings from the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import mixtral_8x7b
from mixtral_jax import config as config_lib
from mixtral_jax.training import build


def test_abstract_build_of_mixtral_8x7b_allocates_nothing():
  config = mixtral_8x7b.get_config()
  config.mesh.update(data=1, fsdp=2, expert=4, tensor=1)
  before = len(jax.live_arrays())
  setup = build.build(config, abstract=True)
  assert setup.state is None and len(jax.live_arrays()) == before
  # Scanned: the 32 layers' parameters stacked on a leading, unsharded axis.
  experts = setup.abstract_state.params["layers"]["moe"]["experts"]
  assert experts["gate_up"].shape == (32, 8, 4096, 2, 14336)
  assert experts["gate_up"].sharding.spec == P(None, "expert", "fsdp", None, "tensor")
  # AdamW moments are sharded like their parameters.
  moments = [s for s in jax.tree.leaves(setup.abstract_state.opt_state,
                                        is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
  assert moments[0].mu["layers"]["moe"]["experts"]["down"].sharding.spec == P(
      None, "expert", "tensor", "fsdp")
  assert setup.abstract_batch()["inputs"].sharding.spec == P(("data", "fsdp", "expert"), None)
  assert setup.model.config.grouped_matmul == "blocked"  # "auto", resolved for CPU at build


def test_state_from_params_gives_the_fresh_state_around_other_params(tiny_config,
                                                                     build_on_one_device):
  setup = build_on_one_device(tiny_config())
  fresh = jax.device_get(setup.state)
  other = jax.tree.map(lambda p: p + 1.0, setup.state.params)
  state = setup.state_from_params(other)
  assert np.array_equal(state.params["embed"], fresh.params["embed"] + 1.0)
  jax.tree.map(np.testing.assert_array_equal, state.replace(params=None),
               fresh.replace(params=None))


def test_invalid_config_is_refused_before_anything_is_built(tiny_config):
  config = tiny_config()
  config.model.num_experts = 6
  config.mesh.update(data=1, expert=4)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.num_experts: 6 is not "
                                                   r"divisible by mesh\.expert=4"):
    build.build(config, jax.devices()[:4])
