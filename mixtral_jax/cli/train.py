"""`mixtral-train`: the command line of the training loop (mixtral_jax/training/loop.py).

    mixtral-train --config=configs/default.py --workdir=/tmp/run \
        --config.num_train_steps=100 --config.model.dispatch=capacity

(or `python -m mixtral_jax.main …`). Importing the library defines no flags; this does.
"""

import logging as pylogging
import os
import sys
import traceback

import jax
from absl import app, flags, logging

from mixtral_jax.cli import common
from mixtral_jax.errors import UserError
from mixtral_jax.parallel import distributed
from mixtral_jax.runtime import cpu_runtime, interrupt, platforms
from mixtral_jax.training import loop


def _only_our_info(record: pylogging.LogRecord) -> bool:
  """Keeps warnings and our own progress; drops libraries' INFO chatter (Orbax logs every save)
  and TFDS's warning that the dataset folder it is building has no dataset_info.json yet.

  Orbax's background threads log a failed save with its traceback; the loop reports the
  failure in one line, so their record keeps its message line only.
  """
  ours = f"{os.sep}mixtral_jax{os.sep}" in record.pathname
  if f"{os.sep}orbax{os.sep}" in record.pathname:
    record.exc_info = record.exc_text = None
  if (f"{os.sep}tensorflow_datasets{os.sep}" in record.pathname and
      record.getMessage().endswith("has no dataset_info.json")):
    return False
  return ours or record.levelno >= pylogging.WARNING


_CONFIG = common.define_config_flag("configs/default.py", "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for metrics and checkpoints.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "End this run after this step, with a checkpoint, as a preemption "
    "would: the schedule still runs to config.num_train_steps, which a rerun continues to.")
_DISTRIBUTED = common.DistributedFlags()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_only_our_info)
  platforms.use_present_platforms()
  try:
    config = _CONFIG.value
    reuse_step_memory = config.get("cpu_reuse_step_memory", False)  # a failed load raises here
  except common.FLAG_ERRORS as e:
    raise common.config_flag_error(e, sys.argv) from None
  if reuse_step_memory:  # before JAX creates its CPU client
    cpu_runtime.reuse_step_memory()
  given = None
  try:
    given = _DISTRIBUTED.settings()
    if given is not None:
      _DISTRIBUTED.join(given)
    loop.train_and_evaluate(config, _WORKDIR.value, _STOP_AT.value)
  except interrupt.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    raise SystemExit(128 + e.signum) from None  # the shell's code for death by that signal
  except UserError as e:
    _fail(f"error: {e}")
  except Exception as e:
    if given is None:
      raise
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    if isinstance(e, jax.errors.JaxRuntimeError) and ("Gloo" in reason or "onnection" in reason):
      _fail(f"error: a collective with another process of this run broke off ({reason}): that "
            f"process probably died; this one stops too. {distributed.LOST_PEER}")
    if isinstance(e, jax.errors.JaxRuntimeError) and "heartbeat timeout" in reason:
      # A barrier (e.g. Orbax's) met the lost peer before the service's own fatal report.
      _fail(distributed.lost_peer_line(reason, _DISTRIBUTED.heartbeat_timeout.value))
    traceback.print_exc()
    _fail("")


def _fail(message: str) -> None:
  """Exits with code 1 after `message`, at once. What would run at a normal exit after a
  failure could only add to it or wait: libraries' exit handlers (TensorBoard flushing its
  events to the disk that just filled, with a traceback) and, with several processes, JAX's
  shutdown waiting for peers that may be blocked in a collective with this one (they see this
  one gone by its heartbeats). The workdir's lock is already released; complete checkpoints
  are complete, and a save cut short is ignored on the next run."""
  if message:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  distributed.close_stderr()
  os._exit(1)


def run() -> None:
  """Console-script entry point (`mixtral-train`)."""
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
