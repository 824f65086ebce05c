"""Wall time a train loop is blocked by an async Orbax save ÷ a synchronous save of the same state.

Default config train state (params + AdamW moments) on one CPU device; saves alternate between
an async and a synchronous Checkpointer (same items and layout), each into its own directory,
and the median of each is compared. Writes its table into benchmarks/README.md.
"""

import os
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import publish  # noqa: E402
from configs import default  # noqa: E402
from mixtral_jax.runtime import cpu_runtime
from mixtral_jax.training import build  # noqa: E402
from mixtral_jax.training import checkpoint

ROUNDS = 5


def main():
  cpu_runtime.reuse_step_memory()  # as mixtral-train does
  config = default.get_config()
  state = build.build(config).state
  jax.block_until_ready(state)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  meta = checkpoint.Meta(config={}, data_position=0)
  blocked, synchronous, completed = [], [], []
  with tempfile.TemporaryDirectory() as root:
    async_ckpt = checkpoint.Checkpointer(os.path.join(root, "async"), keep=2)
    sync_ckpt = checkpoint.Checkpointer(os.path.join(root, "sync"), keep=2, asynchronous=False)
    for step in range(1, ROUNDS + 1):
      start = time.perf_counter()
      async_ckpt.save(step, state, meta)
      blocked.append(time.perf_counter() - start)
      async_ckpt.wait()
      completed.append(time.perf_counter() - start)
      start = time.perf_counter()
      sync_ckpt.save(step, state, meta)
      synchronous.append(time.perf_counter() - start)
    async_ckpt.close()
    sync_ckpt.close()

  block, sync, done = (statistics.median(x) * 1e3 for x in (blocked, synchronous, completed))
  lines = [f"Default config train state ({state_bytes / 1e6:.1f} MB: params + AdamW moments), "
           f"1 CPU device, median of {ROUNDS} saves each.", "",
           "| save | ms |", "|---|---:|",
           f"| async: train loop blocked | {block:.1f} |",
           f"| async: until written | {done:.1f} |",
           f"| synchronous | {sync:.1f} |",
           "", f"**blocked ÷ synchronous = {block / sync:.3f}** (goal ≤ 0.1)"]
  publish("checkpoint", lines)


if __name__ == "__main__":
  main()
