"""benchmarks/gpu.py: one line and exit 0 without a GPU; its packed batches are well formed."""

import os
import subprocess
import sys

import numpy as np

from benchmarks import gpu


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(repo, cpu_env):
  readme = open(os.path.join(repo, "benchmarks", "README.md")).read()
  run = subprocess.run([sys.executable, "benchmarks/gpu.py"], cwd=repo, env=cpu_env(1),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert run.stdout.splitlines() == [
      "benchmarks/gpu.py: no GPU here (JAX backend cpu); nothing measured"]
  assert open(os.path.join(repo, "benchmarks", "README.md")).read() == readme


def test_packed_batches_restart_positions_at_each_document():
  batch = gpu.packed_batch(4, 64, 100)
  segments, positions = batch["segment_ids"], batch["positions"]
  for row in range(4):
    assert sorted(set(segments[row])) == [1, 2, 3]
    assert np.all(np.diff(segments[row]) >= 0)  # documents lie end to end
    starts = np.flatnonzero(np.diff(segments[row])) + 1
    assert np.all(positions[row, starts] == 0) and positions[row, 0] == 0
    assert np.all(batch["weights"][row, starts - 1] == 0)  # no target across a boundary
  assert batch["weights"].sum() == 4 * (64 - 2)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
