"""Pod-sized meshes (16 and 32 simulated devices) start and train as one device does.

The test process simulates 8 devices, so each case runs this file as a script in a process
of its own, which prints the losses of 10 train steps on the mesh and on one device.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# (mesh, devices): batch-sharded devices beyond 8, an expert axis of 16, tensor inside expert.
MESHES = [((8, 1, 2, 1), 16), ((2, 2, 4, 1), 16), ((1, 1, 16, 1), 16), ((4, 1, 8, 1), 32),
          ((2, 2, 4, 2), 32)]
FAST = {(4, 1, 8, 1)}  # in `make test`; the rest in the slow suite


def _losses(mesh, devices, dispatch, steps=10) -> list[float]:
  """Losses of `steps` train steps of a 16-expert model on `mesh` over the first `devices`."""
  import jax
  from configs import default
  from mixtral_jax.training import build
  from mixtral_jax.parallel import sharding

  config = default.get_config()
  config.update(global_batch_size=32, seq_len=16, warmup_steps=2, learning_rate=3e-3)
  config.model.update(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, num_experts=16, block_size=8,
                      dispatch=dispatch, capacity_factor=16.0)
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh)))
  setup = build.build(config, jax.devices()[:devices])
  tokens = np.random.default_rng(7).integers(0, 8, (steps, 32, 17), dtype=np.int32)
  state, losses = setup.state, []
  for t in tokens:
    batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": np.ones((32, 16), np.float32)}
    state, metrics = setup.train_step(state, jax.device_put(batch, setup.batch_sharding))
    losses.append(metrics["loss"])
  return [float(x) for x in losses]


@pytest.mark.parametrize("mesh,devices", [
    pytest.param(m, d, marks=[] if m in FAST else [pytest.mark.slow]) for m, d in MESHES])
def test_a_pod_sized_mesh_starts_and_equals_one_device(mesh, devices, cpu_env):
  out = subprocess.run([sys.executable, __file__, json.dumps([mesh, devices])],
                       env=cpu_env(devices), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for dispatch, (mesh_losses, one_device) in result.items():
    np.testing.assert_allclose(mesh_losses, one_device, rtol=1e-5, err_msg=dispatch)
    assert mesh_losses[-1] < mesh_losses[0]


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  mesh, devices = json.loads(sys.argv[1])
  print(json.dumps({dispatch: (_losses(mesh, devices, dispatch), _losses((1, 1, 1, 1), 1, dispatch))
                    for dispatch in ("dropless", "capacity")}))
