"""`mixtral-train`: the command line of the training loop (mixtral_jax/train.py).

    mixtral-train --config=configs/default.py --workdir=/tmp/run \
        --config.num_train_steps=100 --config.model.dispatch=capacity

(or `python -m mixtral_jax.main …`). The only module that defines flags.
"""

import logging as pylogging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mixtral_jax import checkpoint as checkpoint_lib
from mixtral_jax import config as config_lib
from mixtral_jax import cpu_runtime
from mixtral_jax import files
from mixtral_jax import interrupt
from mixtral_jax import sources
from mixtral_jax import train

def _only_our_info(record: pylogging.LogRecord) -> bool:
  """Keeps warnings and our own progress; drops libraries' INFO chatter (Orbax logs every save).

  Orbax's background threads log a failed save with its traceback; the loop reports the
  failure in one line, so their record keeps its message line only.
  """
  ours = f"{os.sep}mixtral_jax{os.sep}" in record.pathname
  if f"{os.sep}orbax{os.sep}" in record.pathname:
    record.exc_info = record.exc_text = None
  return ours or record.levelno >= pylogging.WARNING


def _config_error(e: Exception, argv: list[str]) -> SystemExit:
  """One line for a --config file that does not load or a --config.* override naming no field."""
  if isinstance(e, AttributeError):  # e.g. --config.learnig_rate
    text = str(e).replace("\\n", " ")
    guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    hint = f"; did you mean {guess[1]}?" if guess else ""
    field = guess[2] if guess else text.strip("'\" ")
    return SystemExit(f"error: a --config.* flag names {field!r}, which is no config field{hint}")
  path = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")][-1:] or [""]
  reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
  return SystemExit(f"error: --config={path[0]}: cannot load it ({reason})")


# ml_collections raises these while parsing the flags (overrides) or on first use (the file).
_CONFIG_ERRORS = (AttributeError, OSError, SyntaxError, ValueError, TypeError, KeyError)


# Defining the flag parses its default file and applies the command line's --config.* overrides.
try:
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                            "Training config file.")
except _CONFIG_ERRORS as error:
  raise _config_error(error, sys.argv) from None
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for metrics and checkpoints.")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except _CONFIG_ERRORS as e:
    raise _config_error(e, argv) from None


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_only_our_info)
  try:
    config = _CONFIG.value
    reuse_step_memory = config.get("cpu_reuse_step_memory", False)  # a failed load raises here
  except _CONFIG_ERRORS as e:
    raise _config_error(e, sys.argv) from None
  if reuse_step_memory:  # before JAX creates its CPU client
    cpu_runtime.reuse_step_memory()
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except interrupt.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    raise SystemExit(128 + e.signum) from None  # the shell's code for death by that signal
  except (config_lib.ConfigError, checkpoint_lib.CheckpointError, sources.DataError,
          files.DirectoryError, files.LockedError, train.NonFiniteError) as e:
    raise SystemExit(f"error: {e}") from None


def run() -> None:
  """Console-script entry point (`mixtral-train`)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
