"""`mixtral-train`: the command line of the training loop (mixtral_jax/train.py).

    mixtral-train --config=configs/default.py --workdir=/tmp/run \
        --config.num_train_steps=100 --config.model.dispatch=capacity

(or `python -m mixtral_jax.main …`). The only module that defines flags.
"""

import logging as pylogging
import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mixtral_jax import checkpoint as checkpoint_lib
from mixtral_jax import config as config_lib
from mixtral_jax import cpu_runtime
from mixtral_jax import distributed
from mixtral_jax import files
from mixtral_jax import interrupt
from mixtral_jax import metrics as metrics_lib
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


# Defining the flag parses its default file and applies the command line's --config.* overrides.
try:
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                            "Training config file.")
except config_lib.FLAG_ERRORS as error:
  raise config_lib.flag_error(error, sys.argv) from None
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for metrics and checkpoints.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "End this run after this step, with a checkpoint, as a preemption "
    "would: the schedule still runs to config.num_train_steps, which a rerun continues to.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES,
    "auto: join a multi-process run when the flags below (or JAX_* variables) say so or a "
    "SLURM/Open MPI/GKE launch of several tasks is detected; yes: always, letting JAX detect "
    "the cluster (TPU VM pod slices); no: never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 (JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run (JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index, 0 … N-1 (JAX_PROCESS_ID).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout", 900,
    "Seconds to wait for every process to connect (a cold pod can take minutes).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as "
    "dead and the others stop.")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout", 300, "Seconds a finishing process waits for the others at exit.")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except config_lib.FLAG_ERRORS as e:
    raise config_lib.flag_error(e, argv) from None


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_only_our_info)
  try:
    config = _CONFIG.value
    reuse_step_memory = config.get("cpu_reuse_step_memory", False)  # a failed load raises here
  except config_lib.FLAG_ERRORS as e:
    raise config_lib.flag_error(e, sys.argv) from None
  if reuse_step_memory:  # before JAX creates its CPU client
    cpu_runtime.reuse_step_memory()
  given = None
  try:
    given = distributed.settings(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                 _PROCESS_ID.value)
    if given is not None:
      distributed.initialize(given, init_timeout=_INIT_TIMEOUT.value,
                             heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
                             shutdown_timeout=_SHUTDOWN_TIMEOUT.value)
    train.train_and_evaluate(config, _WORKDIR.value, _STOP_AT.value)
  except interrupt.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    raise SystemExit(128 + e.signum) from None  # the shell's code for death by that signal
  except (config_lib.ConfigError, checkpoint_lib.CheckpointError, sources.DataError,
          distributed.DistributedError, files.DirectoryError, files.LockedError,
          metrics_lib.MetricsError, train.NonFiniteError) as e:
    _fail(f"error: {e}", several=given is not None)
  except Exception as e:
    if given is None:
      raise
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    if isinstance(e, jax.errors.JaxRuntimeError) and ("Gloo" in reason or "onnection" in reason):
      _fail(f"error: a collective with another process of this run broke off ({reason}): that "
            f"process probably died; this one stops too. {distributed.LOST_PEER}", several=True)
    if isinstance(e, jax.errors.JaxRuntimeError) and "heartbeat timeout" in reason:
      # A barrier (e.g. Orbax's) met the lost peer before the service's own fatal report.
      _fail(distributed.lost_peer_line(reason, _HEARTBEAT_TIMEOUT.value), several=True)
    traceback.print_exc()
    _fail("", several=True)


def _fail(message: str, several: bool) -> None:
  """Exits with code 1 after `message`. One of several processes exits at once: JAX's shutdown
  would wait for peers that may be blocked in a collective with this one; they see it gone by
  its heartbeats instead."""
  if not several:
    raise SystemExit(message) from None
  if message:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  distributed.close_stderr()
  os._exit(1)


def run() -> None:
  """Console-script entry point (`mixtral-train`)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
