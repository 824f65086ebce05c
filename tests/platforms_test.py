"""Commands start the accelerators this host has: with libtpu installed (`make test` installs it)
and no TPU, nothing of libtpu's start-up reaches the output."""

import os
import subprocess
import sys

import pytest

from conftest import assert_output
from mixtral_jax.runtime import platforms
from mixtral_jax.training import loop as train


@pytest.mark.skipif(platforms._has_tpu() or platforms._has_nvidia_gpu(),
                    reason="a host with an accelerator starts its plugin")
def test_a_command_on_a_cpu_host_prints_only_its_own_lines(tmp_path, tiny_config, repo):
  run = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(num_train_steps=2, checkpoint_every_steps=0), run)
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
  result = subprocess.run([sys.executable, "-m", "mixtral_jax.cli.checkpoint", "info", run],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0
  assert_output(result, [r"step +2 +[\d.]+ MB  next batch 2  num_layers=2, .*"], [])
