"""cpu_runtime.reuse_step_memory: a step's scratch memory is not page-faulted in again."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# A jitted step whose temp buffer (the [2048, 8192] hidden layer, 64 MB) is far above glibc's mmap
# threshold, run on one CPU device in a fresh process; prints page faults of its later calls.
_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from mixtral_jax.runtime import cpu_runtime
    applied = cpu_runtime.reuse_step_memory() if sys.argv[1] == "reuse" else False
    import jax, jax.numpy as jnp
    step = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
    x, w = jnp.ones((2048, 512)), jnp.full((512, 8192), 1e-3)
    for _ in range(3):
      step(x, w).block_until_ready()
    faults = []
    for _ in range(8):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      step(x, w).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
""")


def _faults(mode: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_reused_step_memory_is_not_faulted_in_every_step():
  plain, reused = _faults("plain"), _faults("reuse")
  assert reused["applied"]
  pages = 2048 * 8192 * 4 // 4096
  # Without the setting each call maps its 64 MB temp buffer afresh and faults most pages in.
  assert min(plain["faults"]) > pages // 2, plain
  # With it most calls reuse the heap's pages; now and then the heap grows once (when a small
  # allocation lands in the freed block) and that call faults the new pages in.
  assert sorted(reused["faults"])[len(reused["faults"]) // 2] < pages // 20, reused
  assert sum(reused["faults"]) < sum(plain["faults"]) // 3, (plain, reused)
