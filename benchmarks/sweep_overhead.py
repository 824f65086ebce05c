"""Sweep overhead: wall time of a 4-trial `mixtral-sweep` ÷ the sum of the same 4 runs started by
hand with `mixtral-train`, with 1 worker and with 2.

The grid of configs/sweeps/experts.py (4 vs 8 experts × top-1 vs top-2) at 100 steps, one CPU
device per run. A first run by hand builds the corpus and tokenizer and is not counted; then
the 4 runs by hand, one after another, then the sweep with 1 worker, then with 2. Writes its
table into benchmarks/README.md.
"""

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import publish  # noqa: E402
from mixtral_jax.sweep import space as sweep_space  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILE = os.path.join(REPO, "configs", "sweeps", "experts.py")
STEPS = 100
FLAGS = [f"--config={SWEEP_FILE}", f"--config.num_train_steps={STEPS}",
         "--config.eval_every_steps=50", "--config.checkpoint_every_steps=50"]


def _timed(args: list[str]) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True, capture_output=True)
  return time.perf_counter() - start


def main():
  spec = {"model.num_experts": [4, 8], "model.experts_per_token": [1, 2]}
  points = sweep_space.grid_points(sweep_space.as_sweep(spec))
  with tempfile.TemporaryDirectory() as root:
    _timed(["mixtral_jax.main", *FLAGS, f"--workdir={root}/warmup"] +
           sweep_space.trial_flags(points[0]))
    by_hand = [_timed(["mixtral_jax.main", *FLAGS, f"--workdir={root}/hand_{i}"] +
                      sweep_space.trial_flags(point)) for i, point in enumerate(points)]
    swept = {workers: _timed(["mixtral_jax.cli.sweep", *FLAGS, f"--workdir={root}/sweep_{workers}",
                              f"--workers={workers}"]) for workers in (1, 2)}
  total = sum(by_hand)
  lines = [f"configs/sweeps/experts.py's 4 points at {STEPS} steps, 1 CPU device per run "
           f"({os.cpu_count()} cores).", "",
           "| | wall s | ÷ runs by hand |", "|---|---:|---:|",
           f"| 4 runs by hand, one after another ({', '.join(f'{t:.1f}' for t in by_hand)}) | "
           f"{total:.1f} | 1.000 |"]
  lines += [f"| mixtral-sweep, {w} worker{'s' * (w > 1)} | {t:.1f} | {t / total:.3f} |"
            for w, t in swept.items()]
  lines += ["", f"**sweep (1 worker) ÷ runs by hand = {swept[1] / total:.3f}** (goal ≤ 1.05)"]
  publish("sweep_overhead", lines)


if __name__ == "__main__":
  main()
