"""Sweep: top-1 vs top-2 routing × 4 vs 8 experts, the default tiny MoE on the embedded corpus.

    mixtral-sweep --config=configs/sweeps/experts.py --workdir=workdir/sweeps/experts

Four trials of 250 steps (11 minutes on a 2-core CPU); their table and plot are in the README.
"""

from configs import default


def get_config():
  """The base of every trial: the default config for 250 steps, evaluated every 50."""
  config = default.get_config()
  config.num_train_steps = 250
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 125
  return config


def get_sweep():
  """A grid over the number of experts and the experts each token is routed to."""
  return {"model.num_experts": [4, 8], "model.experts_per_token": [1, 2]}
