"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backend.

Compiled programs are cached on disk for the session (and the CLI runs it starts): many tests
compile the same tiny train steps, and a cache hit skips XLA's compile, not any computation.
pytest-xdist workers inherit the directory from the controlling process, which removes it.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="mixtral_jax_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR


def pytest_sessionfinish(session, exitstatus):
  if _CACHE_DIR:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
