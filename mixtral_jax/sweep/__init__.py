"""Config sweeps on Optuna.

A sweep file (configs/sweeps/NAME.py) is a training config file with one more function:
`get_config()` is the base of every trial and `get_sweep()` the space, either a dict from config
field paths to lists of values (a grid) or a `Sweep` (a grid, or a random or TPE search over
`uniform`, `loguniform`, `intuniform` and `choice` ranges), imported from here.

space.py is that language, study.py the Optuna study, driver.py the workers that run trials,
trial.py a trial's parent process, pod.py a sweep over a pod's processes, results.py the tables
and plots; `mixtral-sweep` (cli/sweep.py) is the command line.
"""

from mixtral_jax.sweep.space import (Sweep, SweepError, choice, intuniform, loguniform,
                                     uniform)

__all__ = ["Sweep", "SweepError", "choice", "intuniform", "loguniform", "uniform"]
