"""Expert parallelism on 8 simulated CPU devices, for the default config.

(a) all-to-all bytes per MoE layer in the compiled train step ÷ the theoretical minimum
    (2 directions × 2 passes (fwd, bwd) × tokens × k × hidden × bytes, per device);
    off-device traffic is (e−1)/e of both, so the ratio is the same.
(b) per-device bytes of params + AdamW moments ÷ the ideal (shared params + experts / e) × 3.
(c) train-step time on 8 simulated devices ÷ on 1 device (the 8 share this machine's cores,
    so this is overhead, not speed-up).
Every step is the one `mixtral-train` runs (`build.build`: sharded, state donated).
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import publish  # noqa: E402
from configs import default  # noqa: E402
from mixtral_jax.parallel import sharding  # noqa: E402
from mixtral_jax.runtime.hlo_stats import all_to_all_bytes  # noqa: E402
from mixtral_jax.training import build as build_lib  # noqa: E402

REPEATS = 3


def build(config, devices):
  setup = build_lib.build(config, devices)
  tokens = jax.random.randint(jax.random.PRNGKey(0),
                              (config.global_batch_size, config.seq_len + 1), 0, 1000)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                          "weights": jnp.ones((config.global_batch_size, config.seq_len))},
                         setup.batch_sharding)
  return setup.state, setup.train_step, batch


def step_seconds(state, step, batch):
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  best = float("inf")
  for _ in range(REPEATS):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    best = min(best, time.perf_counter() - start)
  return best


def device0_bytes(state):
  device = jax.devices()[0]
  return sum(s.data.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state))
             for s in leaf.addressable_shards if s.device == device)


def ideal_bytes(state, ep):
  params = state.params
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  experts = sum(layer["moe"]["experts"][name].nbytes for key, layer in params.items()
                if key.startswith("layer_") for name in ("gate_up", "down"))
  return 3 * (total - experts + experts / ep)  # params + AdamW mu + nu


def main():
  base = default.get_config()
  model = base.model
  rows = []
  one_device = {}
  for dispatch in ("capacity", "dropless"):
    config = default.get_config()
    config.model.update(dispatch=dispatch, capacity_factor=1.0)
    state, step, batch = build(config, jax.devices()[:1])
    one_device[dispatch] = step_seconds(state, step, batch)
    del state
  for mesh_shape in ((1, 1, 8, 1), (2, 1, 4, 1)):
    ep = mesh_shape[2]
    for dispatch in ("capacity", "dropless"):
      config = default.get_config()
      config.model.update(dispatch=dispatch, capacity_factor=1.0)
      config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
      state, step, batch = build(config, jax.devices())
      hlo = step.lower(state, batch).compile().as_text()
      per_layer = sum(all_to_all_bytes(hlo)) / model.num_layers
      tokens = config.global_batch_size * config.seq_len // (mesh_shape[0] * mesh_shape[1] * ep)
      minimum = 2 * 2 * tokens * model.experts_per_token * model.hidden_size * 4
      memory = device0_bytes(state) / ideal_bytes(state, ep)
      seconds = step_seconds(state, step, batch)
      rows.append(f"| {mesh_shape} | {dispatch} | {per_layer / 1e6:.2f} | "
                  f"{per_layer / minimum:.2f} | {memory:.3f} | {seconds / one_device[dispatch]:.2f} |")
      del state

  lines = [f"Default config (hidden {model.hidden_size}, E={model.num_experts}, "
           f"k={model.experts_per_token}, batch {base.global_batch_size}×{base.seq_len}), "
           "capacity_factor 1.0, f32, 8 simulated CPU devices on one 2-core machine.", "",
           "| mesh (data, fsdp, expert, tensor) | dispatch | all-to-all MB/layer/device "
           "| ÷ minimum (a) | memory ÷ ideal (b) | step ÷ 1 device (c) |",
           "|---|---|---:|---:|---:|---:|"] + rows
  publish("expert_parallel", lines)


if __name__ == "__main__":
  main()
