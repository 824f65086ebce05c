"""`mixtral-train`: the command line of the training loop (mixtral_jax/train.py).

    mixtral-train --config=configs/default.py --workdir=/tmp/run \
        --config.num_train_steps=100 --config.model.dispatch=capacity

(or `python -m mixtral_jax.main …`). The only module that defines flags.
"""

import logging as pylogging
import os
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

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for metrics and checkpoints.")


def _only_our_info(record: pylogging.LogRecord) -> bool:
  """Keeps warnings and our own progress; drops libraries' INFO chatter (Orbax logs every save)."""
  return record.levelno >= pylogging.WARNING or f"{os.sep}mixtral_jax{os.sep}" in record.pathname


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_only_our_info)
  if _CONFIG.value.get("cpu_reuse_step_memory", False):  # before JAX creates its CPU client
    cpu_runtime.reuse_step_memory()
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except interrupt.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    raise SystemExit(128 + e.signum) from None  # the shell's code for death by that signal
  except (config_lib.ConfigError, checkpoint_lib.CheckpointError, sources.DataError,
          files.LockedError, train.NonFiniteError) as e:
    raise SystemExit(f"error: {e}") from None


def run() -> None:
  """Console-script entry point (`mixtral-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
