"""CPU runtime setting: keep each train step's scratch memory mapped between steps.

XLA:CPU allocates an executable's whole temp buffer with one `malloc` per execution (over a GB
for a mid-sized model's train step). glibc serves blocks that large with a fresh `mmap` and
unmaps them on `free`, so every step faults its scratch pages in again (figures in
benchmarks/README.md). Two settings together avoid it:

- synchronous CPU dispatch (`jax_cpu_enable_async_dispatch=False`): single-device programs run
  on the calling thread, whose malloc arena is glibc's main one;
- `mallopt(M_MMAP_MAX, 0)` and a high `M_TRIM_THRESHOLD`: the main arena serves large blocks
  from its heap and keeps them after `free`, so the next step reuses the same pages.

Either alone changes nothing: other threads' arenas fall back to `mmap` for large blocks
whatever `M_MMAP_MAX` says. The costs: the process keeps up to the trim threshold of freed
memory, and the Python thread waits for each single-device step, so the host cannot prepare
the next batch meanwhile. Multi-device programs keep their parallel dispatch.
"""

import ctypes
import ctypes.util

import jax
from absl import logging

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Freed heap memory kept by the process before glibc returns it (mallopt takes an int).
_TRIM_THRESHOLD_BYTES = 2**31 - 1


def reuse_step_memory() -> bool:
  """Applies both settings; returns False (and changes nothing) where libc is not glibc.

  Call before the first JAX computation: the dispatch setting is read when the CPU client is
  created.
  """
  path = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(path)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # glibc only
  except (OSError, AttributeError, TypeError):
    logging.info("cpu_reuse_step_memory: libc %s is not glibc; left as it is", path)
    return False
  if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)):
    logging.warning("cpu_reuse_step_memory: glibc refused mallopt; left as it is")
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True
