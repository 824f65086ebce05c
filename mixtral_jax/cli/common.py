"""What every command line shares: one-line errors (any `UserError`), the training config flag
(`--config=FILE` and its `--config.*` overrides) and the flags that join a multi-process run.

mixtral-train and mixtral-sweep take a training config, so they parse with absl and
ml_collections' config flags, and define the distributed flags here; the other commands parse
their few arguments with argparse. All of them report a `UserError` as `error: <its line>`.
"""

import functools
import re
import sys
from typing import Callable, Optional

import ml_collections
from absl import flags
from ml_collections import config_flags

from mixtral_jax.errors import UserError
from mixtral_jax.parallel import distributed

# Flags defined by the functions below belong to the command that calls them (--help lists them).
flags.disclaim_key_flags()

# ml_collections raises these while parsing --config flags (overrides) or on first use (the file).
FLAG_ERRORS = (AttributeError, OSError, SyntaxError, ValueError, TypeError, KeyError)


def config_flag_error(e: Exception, argv: list[str]) -> SystemExit:
  """One line for a --config file that does not load or a --config.* override naming no field
  (`e` one of FLAG_ERRORS, `argv` the command line)."""
  if isinstance(e, AttributeError):  # e.g. --config.learnig_rate
    text = str(e).replace("\\n", " ")
    guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    hint = f"; did you mean {guess[1]}?" if guess else ""
    field = guess[2] if guess else text.strip("'\" ")
    return SystemExit(f"error: a --config.* flag names {field!r}, which is no config field{hint}")
  path = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")][-1:] or [""]
  reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
  return SystemExit(f"error: --config={path[0]}: cannot load it ({reason})")


def define_config_flag(default: Optional[str], help_text: str):
  """The calling command's `--config` flag; defining it loads the file and applies the
  command line's --config.* overrides, so a bad one exits here with one line."""
  try:
    return config_flags.DEFINE_config_file("config", default, help_text)
  except FLAG_ERRORS as error:
    raise config_flag_error(error, sys.argv) from None


def parse_config_args(args: list[str], default: str) -> ml_collections.ConfigDict:
  """The config of `--config=FILE` (else `default`) and the `--config.*` overrides in `args`, as
  mixtral-train reads them; raises absl's and ml_collections' own errors."""
  values = flags.FlagValues()
  flag = config_flags.DEFINE_config_file("config", default, "Config file.", flag_values=values)
  values(["config"] + list(args))
  return flag.value


def load_config(path: str) -> ml_collections.ConfigDict:
  """get_config() of the config file at `path`, as --config=PATH loads it (one line if not)."""
  try:
    return parse_config_args([], path)
  except FLAG_ERRORS as e:
    raise config_flag_error(e, [f"--config={path}"]) from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser (for `app.run`), with --config errors as one line."""
  from absl import app
  try:
    return app.parse_flags_with_usage(argv)
  except FLAG_ERRORS as e:
    raise config_flag_error(e, argv) from None


class DistributedFlags:
  """The flags that join a multi-process run, one definition for every command that can."""

  def __init__(self, help_suffix: str = ""):
    self.mode = flags.DEFINE_enum(
        "distributed", "auto", distributed.MODES,
        "auto: join a multi-process run when the flags below (or JAX_* variables) say so or a "
        "SLURM/Open MPI/GKE launch of several tasks is detected; yes: always, letting JAX "
        "detect the cluster (TPU VM pod slices); no: never." + help_suffix)
    self.coordinator = flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0 (JAX_COORDINATOR_ADDRESS).")
    self.num_processes = flags.DEFINE_integer(
        "num_processes", None, "Processes in the run (JAX_NUM_PROCESSES).")
    self.process_id = flags.DEFINE_integer(
        "process_id", None, "This process's index, 0 … N-1 (JAX_PROCESS_ID).")
    self.init_timeout = flags.DEFINE_integer(
        "distributed_init_timeout", 900,
        "Seconds to wait for every process to connect (a cold pod can take minutes).")
    self.heartbeat_timeout = flags.DEFINE_integer(
        "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as "
        "dead and the others stop.")
    self.shutdown_timeout = flags.DEFINE_integer(
        "shutdown_timeout", 300, "Seconds a finishing process waits for the others at exit.")

  def settings(self) -> Optional[dict]:
    """The multi-process run the flags describe (`distributed.settings`), or None on one
    process. Raises DistributedError (a UserError) for a bad setting."""
    return distributed.settings(self.mode.value, self.coordinator.value,
                                self.num_processes.value, self.process_id.value)

  def join(self, given: dict) -> None:
    """Joins the run of `settings()`; DistributedError if the processes cannot connect. A
    process that fails here is one of several: it must exit without JAX's shutdown barrier."""
    distributed.initialize(given, init_timeout=self.init_timeout.value,
                           heartbeat_timeout=self.heartbeat_timeout.value,
                           shutdown_timeout=self.shutdown_timeout.value)


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
  """Wraps a command's `main`: a UserError prints `error: <its line>` and returns 1."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1

  return wrapped
