"""Commands start the accelerators this host has: with libtpu installed (`make test` installs it)
and no TPU, nothing of libtpu's start-up reaches the output."""

import subprocess
import sys

import pytest

from conftest import DATA_LINES, PROGRESS_LINES, Repeated, assert_output, user_env
from mixtral_jax.runtime import platforms


@pytest.mark.skipif(platforms._has_tpu() or platforms._has_nvidia_gpu(),
                    reason="a host with an accelerator starts its plugin")
def test_commands_on_a_cpu_host_print_only_their_own_lines(tmp_path, train_flags, repo):
  # As `make test` then `make train` leave it: libtpu installed, none of the variables the
  # tests set for it.
  env = user_env()
  run = str(tmp_path / "run")
  result = subprocess.run([sys.executable, "-m", "mixtral_jax.main", *train_flags(run, 2)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  info = Repeated(r"I\d{4} [\d:.]+ +\d+ \S+:\d+\] .*")  # not even a warning
  assert_output(result, [DATA_LINES, "model: .*", PROGRESS_LINES, "done: .*"], [info])
  result = subprocess.run([sys.executable, "-m", "mixtral_jax.cli.checkpoint", "info", run],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0
  assert_output(result, [r"step +2 +[\d.]+ MB  next batch 2  num_layers=2, .*"], [])
