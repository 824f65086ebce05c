"""AdamW's weight decay: which of a real model's parameters it shrinks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.training import optimizer


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_shrinks_the_matrices_only(tiny_config, build_on_one_device, scan_layers):
  config = tiny_config(weight_decay=0.5, learning_rate=1e-2, warmup_steps=0)
  config.model.update(scan_layers=scan_layers, router_balance="both")  # a router bias too
  setup = build_on_one_device(config)
  params = setup.state.params
  names = {jax.tree_util.keystr(path): leaf for path, leaf in
           jax.tree_util.tree_leaves_with_path(optimizer.decay_mask(params))}
  exempt = sorted(k for k, decayed in names.items() if not decayed)
  assert exempt and all(k.endswith(("['scale']", "['bias']")) for k in exempt), exempt
  assert all(decayed for k, decayed in names.items()
             if k.endswith(("['kernel']", "['embed']", "['gate_up']", "['down']"))), names
  # One update from a zero gradient: only decay moves a parameter.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = setup.optimizer.update(zeros, setup.optimizer.init(params), params)
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    name = jax.tree_util.keystr(path)
    if name.endswith(("['scale']", "['bias']")):
      np.testing.assert_array_equal(update, 0, err_msg=name)
    else:
      assert np.abs(np.asarray(update)).max() > 0, name
