"""Sweep: top-1 vs top-2 routing × 4 vs 8 experts, the default tiny MoE on the embedded corpus.

    mixtral-sweep --config=configs/sweeps/experts.py --workdir=workdir/sweeps/experts

Four trials of the default 500 steps; their table and plot are in the README.
"""

from configs import default


def get_config():
  """The base of every trial: the default config, evaluated every 100 steps for the curves."""
  config = default.get_config()
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config


def get_sweep():
  """A grid over the number of experts and the experts each token is routed to."""
  return {"model.num_experts": [4, 8], "model.experts_per_token": [1, 2]}
