"""Sweep: how the default tiny MoE keeps its 8 experts balanced, on the embedded corpus: the aux
loss (Switch), aux-loss-free selection biases (DeepSeek-V3), or both.

    mixtral-sweep --config=configs/sweeps/balancing.py --workdir=workdir/sweeps/balancing

Six trials of 250 steps (each method at the bias rates 1e-3 and 1e-2; the aux loss ignores the
rate, so its two trials are one run twice); their table (eval loss, the busiest expert's load ÷
the balanced load, starved experts) and plots are in the README.
"""

from configs.sweeps.experts import get_config  # noqa: F401  (the same base: 250 steps)


def get_sweep():
  """A grid over the balancing method and the bias's step (the aux coefficient stays the
  default's 0.02)."""
  return {"model.router_balance": ["aux_loss", "aux_free", "both"],
          "model.router_bias_rate": [1e-3, 1e-2]}
