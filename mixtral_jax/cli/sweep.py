"""`mixtral-sweep`: the command line of config sweeps (mixtral_jax/sweep/).

    mixtral-sweep --config=configs/sweeps/experts.py --workdir=/tmp/sweep \
        [--config.num_train_steps=200 …] [--workers=2] [--storage=URL]
    mixtral-sweep status /tmp/sweep

--config is the sweep file (its get_config() is the base of every trial, get_sweep() the
space); --config.* flags change that base for every trial, as they do for mixtral-train. Rerun
the same command after a stop or a crash: finished trials are kept and interrupted ones resume.
"""

import importlib.util
import os
import signal
import socket
import sys

import optuna
from absl import app, flags
from ml_collections import config_flags

from mixtral_jax.cli import common
from mixtral_jax.errors import UserError
from mixtral_jax.runtime import files
from mixtral_jax.sweep import driver as sweep_driver
from mixtral_jax.sweep import pod as sweep_pod
from mixtral_jax.sweep import results as sweep_results
from mixtral_jax.sweep import space as sweep_space
from mixtral_jax.sweep import study as sweep_study

_CONFIG = common.define_config_flag(
    None, "Sweep file: get_config() (the base of every trial) and get_sweep().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep: its study, results and "
                               "a trial_<n> workdir per trial.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Trials run at once (on a multi-GPU host, each on "
                                "an equal share of the GPUs).")
_STORAGE = flags.DEFINE_string(
    "storage", None, "Optuna storage shared by the workers of several hosts: an RDB URL "
    "(postgresql://…, mysql://…) or a path ending in .journal on a shared file system "
    "(default: WORKDIR/study.journal).")
_STUDY_NAME = flags.DEFINE_string("study_name", sweep_study.STUDY_NAME, "The study's name in the "
                                  "storage.")
_DISTRIBUTED = common.DistributedFlags(
    " On a pod (launch/) every process runs mixtral-sweep, process 0 runs the study, "
    "and each trial trains on the whole mesh.")
_POLL_SECONDS = flags.DEFINE_float("poll_seconds", 1.0, "How often a worker reads its trial's "
                                   "metrics (to report them to the pruner).")


def _overrides(argv: list[str]) -> list[str]:
  """The command line's --config.* flags, as `--config.a.b=value`, for every trial."""
  found = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      found.append(arg if "=" in arg or i + 1 >= len(argv) else f"{arg}={argv[i + 1]}")
  return found


def _load_sweep(path: str) -> sweep_space.Sweep:
  spec = importlib.util.spec_from_file_location("_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_sweep", None)):
    raise sweep_space.SweepError(f"--config={path} has no get_sweep(): a sweep file defines "
                               "get_config() and get_sweep()")
  return sweep_space.as_sweep(module.get_sweep())


def _status(workdir: str) -> None:
  study = sweep_study.load_study(workdir, _STORAGE.value, _STUDY_NAME.value)
  print(sweep_results.to_markdown(sweep_results.write(study, workdir)), end="")


def _join_pod() -> "sweep_pod.Pod | None":
  """This process's place among the sweep's processes on a pod; None on one host."""
  given = _DISTRIBUTED.settings()
  if given is None:
    return None
  _DISTRIBUTED.join(given)
  address = given["coordinator_address"]
  host = address.rsplit(":", 1)[0] if address else socket.gethostbyname(socket.gethostname())
  return sweep_pod.Pod(host)


def _sweep() -> int:
  """Runs the sweep; returns the exit code (128 + the signal when stopped by one)."""
  if _CONFIG.value is None:
    raise sweep_space.SweepError("give --config=configs/sweeps/NAME.py, the sweep file")
  if not _WORKDIR.value:
    raise sweep_space.SweepError("give --workdir=DIR, the sweep's directory")
  if _WORKERS.value < 1:
    raise sweep_space.SweepError(f"--workers={_WORKERS.value}: must be at least 1")
  try:
    base = _CONFIG.value
  except common.FLAG_ERRORS as e:
    raise common.config_flag_error(e, sys.argv) from None
  config_file = os.path.abspath(config_flags.get_config_filename(flags.FLAGS["config"]))
  sweep = _load_sweep(config_file)
  overrides = _overrides(sys.argv[1:])
  sweep_space.check_fields(base, sweep, overrides)
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  files.make_directory(workdir, "--workdir")
  pod = _join_pod()
  primary = pod is None or pod.primary
  study = sweep_study.open_study(workdir, sweep, _STORAGE.value, _STUDY_NAME.value) if primary \
      else None
  driver = sweep_driver.Driver(study, sweep, base, config_file, overrides, workdir,
                            workers=_WORKERS.value, poll_seconds=_POLL_SECONDS.value, pod=pod)
  stopped_by = []

  def stop(signum, frame):
    stopped_by.append(signum)
    driver.stop.set()
    print(f"mixtral-sweep: {signal.Signals(signum).name}: stopping the running trials (they "
          "save a checkpoint)", file=sys.stderr, flush=True)

  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, stop)
  if not primary:
    driver.follow()
    return 128 + stopped_by[0] if stopped_by else 0
  driver.run()
  table = sweep_results.write(study, workdir)
  print(sweep_results.to_markdown(table), end="")
  if stopped_by:
    print(f"stopped by {signal.Signals(stopped_by[0]).name}; rerun the same command to resume",
          file=sys.stderr)
    return 128 + stopped_by[0]
  print(f"results: {workdir}/results.md, results.csv, eval_loss_curves.png, "
        "max_load_curves.png, objective_by_field.png")
  return 0


def main(argv) -> None:
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  args = argv[1:]
  try:
    if args[:1] == ["status"]:
      if len(args) != 2:
        raise app.UsageError("usage: mixtral-sweep status DIR")
      _status(args[1])
      return
    if args:
      raise app.UsageError(f"Unexpected arguments: {args}")
    code = _sweep()
  except UserError as e:
    raise SystemExit(f"error: {e}") from None
  raise SystemExit(code)


def run() -> None:
  """Console-script entry point (`mixtral-sweep`)."""
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
