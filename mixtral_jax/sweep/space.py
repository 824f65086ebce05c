"""A sweep's space: the `Sweep` a sweep file's get_sweep() returns (a grid, or a random or TPE
search over ranges), checked against the config, and each trial's values as a config and flags."""

import copy
import dataclasses
import difflib
import itertools
from typing import Any, Mapping, Optional, Sequence

import ml_collections
import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from mixtral_jax import config as config_lib
from mixtral_jax.errors import UserError

METHODS = ("grid", "random", "tpe")
DIRECTIONS = ("minimize", "maximize")


def uniform(low: float, high: float) -> FloatDistribution:
  """A float drawn uniformly from [low, high]."""
  return FloatDistribution(low, high)


def loguniform(low: float, high: float) -> FloatDistribution:
  """A float whose log is uniform in [log low, log high] (learning rates, weight decays)."""
  return FloatDistribution(low, high, log=True)


def intuniform(low: int, high: int, step: int = 1) -> IntDistribution:
  """An integer from low, low + step, …, high."""
  return IntDistribution(low, high, step=step)


def choice(*values) -> CategoricalDistribution:
  """One of `values`."""
  return CategoricalDistribution(values)


class SweepError(UserError, ValueError):
  """The sweep cannot run as given; the message names the field or file."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep's space and how it is searched.

  `params` maps config field paths ("model.num_experts") to a list of values (every one is
  tried, in a grid) or, for method "random"/"tpe", a range from `uniform`, `loguniform`,
  `intuniform` or `choice`. A search runs `num_trials` trials; a grid runs every point.
  `pruner` (an optuna pruner) stops trials whose objective, reported at each evaluation, is
  hopeless. `objective` is a metric of metrics.jsonl; its last value is the trial's result.
  """
  params: Mapping[str, Any]
  method: str = "grid"
  num_trials: Optional[int] = None
  pruner: Optional[optuna.pruners.BasePruner] = None
  seed: int = 0
  objective: str = "eval_loss"
  direction: str = "minimize"


_SCALARS = (bool, int, float, str)


def as_sweep(value: Any) -> Sweep:
  """`get_sweep()`'s result as a checked Sweep (a dict is a grid); SweepError names the fault."""
  sweep = Sweep(params=value) if isinstance(value, Mapping) else value
  if not isinstance(sweep, Sweep):
    raise SweepError(f"get_sweep() returned a {type(value).__name__}; expected a dict of field "
                     "paths to lists (a grid) or a mixtral_jax.sweep.Sweep")
  if sweep.method not in METHODS:
    raise SweepError(f"Sweep.method={sweep.method!r}: must be one of {', '.join(METHODS)}")
  if sweep.direction not in DIRECTIONS:
    raise SweepError(f"Sweep.direction={sweep.direction!r}: must be one of "
                     f"{', '.join(DIRECTIONS)}")
  if not isinstance(sweep.params, Mapping) or not sweep.params:
    raise SweepError("the sweep has no parameters: give at least one field path and its values")
  for path, values in sweep.params.items():
    if not isinstance(path, str) or not path:
      raise SweepError(f"sweep parameter {path!r}: keys are config field paths such as "
                       "'model.num_experts'")
    if isinstance(values, (list, tuple)):
      if not values or not all(isinstance(v, _SCALARS) for v in values):
        raise SweepError(f"sweep parameter {path!r}: give a non-empty list of numbers, strings "
                         f"or booleans, got {values!r}")
      if len(set(map(repr, values))) != len(values):
        raise SweepError(f"sweep parameter {path!r}: {values!r} repeats a value")
    elif isinstance(values, BaseDistribution):
      if sweep.method == "grid":
        raise SweepError(f"sweep parameter {path!r}: a range needs method 'random' or 'tpe'; "
                         "a grid takes a list of values")
    else:
      raise SweepError(f"sweep parameter {path!r}: expected a list of values or a range "
                       f"(uniform, loguniform, intuniform, choice), got {values!r}")
  if sweep.method == "grid":
    if sweep.num_trials is not None:
      raise SweepError("Sweep.num_trials is for method 'random' or 'tpe'; a grid runs every point")
  elif not (isinstance(sweep.num_trials, int) and sweep.num_trials > 0):
    raise SweepError(f"Sweep.num_trials={sweep.num_trials!r}: a {sweep.method} search needs a "
                     "positive number of trials")
  if sweep.pruner is not None and not isinstance(sweep.pruner, optuna.pruners.BasePruner):
    raise SweepError(f"Sweep.pruner={sweep.pruner!r}: expected an optuna.pruners pruner")
  return sweep


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
  """Every point of a grid, the last field varying fastest."""
  paths = list(sweep.params)
  return [dict(zip(paths, values)) for values in itertools.product(*sweep.params.values())]


def distributions(sweep: Sweep) -> dict[str, BaseDistribution]:
  """Each field's Optuna distribution; a list of values is a choice among them."""
  return {path: values if isinstance(values, BaseDistribution) else CategoricalDistribution(values)
          for path, values in sweep.params.items()}


def describe(sweep: Sweep) -> dict[str, Any]:
  """The space as JSON-able data, stored with the study (a rerun must search the same space)."""
  return {"method": sweep.method, "objective": sweep.objective, "direction": sweep.direction,
          "params": {path: optuna.distributions.distribution_to_json(d)
                     for path, d in distributions(sweep).items()}}


def _leaf(config: ml_collections.ConfigDict, path: str):
  """(parent ConfigDict, field name) of `path`; SweepError if it names no field."""
  node, parts = config, path.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      here = ".".join(parts[:depth])
      names = [f"{here}.{k}" if here else k for k in node] if isinstance(
          node, ml_collections.ConfigDict) else []
      guess = difflib.get_close_matches(path, names, n=1)
      hint = f"; did you mean {guess[0]}?" if guess else ""
      raise SweepError(f"sweep field {path!r} is no config field{hint}")
    if depth < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise SweepError(f"sweep field {path!r} is a group of fields; name one of them")
  return node, parts[-1]


def check_fields(config: ml_collections.ConfigDict, sweep: Sweep,
                 overrides: Sequence[str] = ()) -> None:
  """SweepError if a swept path is no field of `config`, or a --config.* flag in `overrides`
  sets a swept field (the sweep would silently override it)."""
  for path in sweep.params:
    _leaf(config, path)
  for flag in overrides:
    field = flag.split("=", 1)[0].removeprefix("--config.")
    if field in sweep.params:
      raise SweepError(f"{flag.split('=', 1)[0]} sets a field the sweep varies; drop the flag "
                       "or the field from get_sweep()")


def trial_config(base: ml_collections.ConfigDict,
                 values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`base` with a trial's values set and checked; SweepError with the validator's message if
  the point is not a valid training config."""
  config = copy.deepcopy(base)
  for path, value in values.items():
    parent, name = _leaf(config, path)
    try:
      parent[name] = value
    except TypeError:
      raise SweepError(f"config.{path}={value!r}: the field holds a "
                       f"{type(parent[name]).__name__}") from None
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise SweepError(str(e)) from None
  return config


def flag_value(value: Any) -> str:
  """`value` as a --config.* flag writes it."""
  if isinstance(value, bool):
    return "true" if value else "false"
  return repr(value) if isinstance(value, float) else str(value)


def trial_flags(values: Mapping[str, Any]) -> list[str]:
  """The --config.* flags that set a trial's values."""
  return [f"--config.{path}={flag_value(value)}" for path, value in values.items()]
