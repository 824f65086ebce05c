"""The training loop: build → data → restore or init → steps, with logs, evals and checkpoints.

`mixtral-train` (mixtral_jax/cli/train.py) is its command line. Importing this module defines no
flags.
"""

import json
import signal
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from mixtral_jax import config as config_lib
from mixtral_jax.data import processes
from mixtral_jax.data.pipeline import LMData
from mixtral_jax.errors import UserError
from mixtral_jax.model.mixtral import count_params
from mixtral_jax.runtime import files, interrupt
from mixtral_jax.runtime.files import write_atomically
from mixtral_jax.runtime.workdir import WorkDir
from mixtral_jax.training import build as build_lib
from mixtral_jax.training import checkpoint as checkpoint_lib
from mixtral_jax.training import metrics as metrics_lib
from mixtral_jax.training import plot


class NonFiniteError(UserError, RuntimeError):
  """Training stopped after too many consecutive steps with NaN/Inf loss or gradients."""


def _device_reads():
  """The scope of every device→host read the loop makes: log, eval and checkpoint steps only.

  Any read outside it is a per-step sync that stalls the device; under a stricter transfer
  guard (e.g. JAX_TRANSFER_GUARD_DEVICE_TO_HOST=disallow) it fails.
  """
  return jax.transfer_guard_device_to_host("allow")


def evaluate(setup: build_lib.Setup, params, data: LMData, rows: processes.ProcessRows,
             num_batches: int) -> dict[str, float]:
  """Mean held-out cross-entropy (nats/token) and perplexity over `num_batches` batches."""
  sums = [setup.eval_step(params, rows.global_batch(batch))
          for batch in data.eval_batches(num_batches)]
  with _device_reads():
    sums = jax.device_get(sums)
  loss_sum, weight_sum = (sum(float(s[i]) for s in sums) for i in (0, 1))
  eval_loss = loss_sum / max(weight_sum, 1.0)
  return {"eval_loss": eval_loss, "eval_perplexity": float(np.exp(eval_loss))}


def _check_finite(streak: int, step: int, config, checkpointer) -> None:
  if config.max_nan_steps and streak >= config.max_nan_steps:
    checkpointer.close()
    raise NonFiniteError(
        f"step {step}: loss or gradients were NaN/Inf for {streak} steps in a row "
        f"(config.max_nan_steps={config.max_nan_steps}); stopped without saving, the last "
        f"checkpoint is step {checkpointer.latest_step()}")


class _Interval:
  """The per-step metrics of one log interval, on the device until the interval is logged."""

  def __init__(self):
    self.metrics, self.start, self.excluded = [], time.perf_counter(), 0.0

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation) out of the interval's step time."""
    self.excluded += seconds

  def mean(self) -> tuple[dict[str, Any], int, float]:
    """(mean metrics, last step's NaN/Inf streak, seconds per step); reads the device."""
    with _device_reads():
      history = jax.device_get(self.metrics)
    streak = int(history[-1].pop("nonfinite_streak"))
    for record in history[:-1]:
      record.pop("nonfinite_streak")
    mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *history)
    seconds = (time.perf_counter() - self.start - self.excluded) / len(history)
    return mean, streak, seconds


class _Profile:
  """A jax.profiler trace of config.profile_steps into WORKDIR/profile (a resumed run traces
  what is left of them)."""

  def __init__(self, config: ml_collections.ConfigDict, directory: str, start_step: int):
    steps = config_lib.profile_range(config)
    self.first, self.last = steps if steps else (0, -1)
    self.first = max(self.first, start_step + 1)
    self.directory, self.tracing = directory, False

  def before(self, step: int) -> None:
    if step == self.first and step <= self.last:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.tracing = True

  def after(self, step: int, state, is_last: bool) -> None:
    if self.tracing and (step == self.last or is_last):
      jax.block_until_ready(state)  # the trace holds the traced steps' device work
      jax.profiler.stop_trace()
      self.tracing = False
      print(f"profile of steps {self.first}-{step} in {self.directory}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at_step: Optional[int] = None,
                       devices: Optional[Sequence[jax.Device]] = None) -> dict[str, Any]:
  """Trains `config` in `workdir` on `devices` (default: all) and returns a summary.

  Resumes from the latest checkpoint in `workdir` if there is one. `stop_at_step` ends the run
  early (with a checkpoint), as a preemption would, without changing the schedule. SIGTERM or
  Ctrl-C does the same at the next step boundary, then raises interrupt.Interrupted. The
  summary holds the first and last logged loss, the last evaluation and the corpus's unigram
  entropy. Raises files.DirectoryError if `workdir` cannot be a writable directory,
  files.LockedError if another run holds it, config.ConfigError if
  the checkpoint's config differs where it must not. Nothing in `workdir` changes until the
  config, the lock and the checkpoint (if any) are checked.
  """
  setup = build_lib.build(config, devices, abstract=True)  # validates the config
  files.make_directory(workdir, "--workdir")
  run_dir = WorkDir(workdir)
  lock = run_dir.lock()
  if jax.process_index() == 0:
    lock.acquire()
  try:
    with interrupt.StopRequests(shared=jax.process_count() > 1) as stops:
      return _train(setup, run_dir, stop_at_step, stops)
  finally:
    lock.release()


def _restore_or_init(setup: build_lib.Setup, checkpointer: checkpoint_lib.Checkpointer):
  """(state, start step, this process's data state) to train from: the latest checkpoint that
  reads back, its config checked against this run's first; a fresh state if there is none.

  A damaged checkpoint (files that some process cannot read back) is set aside with a warning
  and the one before it used, by every process alike; if the oldest is damaged too, its one-line
  error is raised.
  """
  steps = checkpointer.all_steps()
  for step in reversed(steps):
    try:
      return _restore(setup, checkpointer, step)
    except checkpoint_lib.DamagedCheckpointError as e:
      if step == steps[0]:
        raise
      aside = checkpointer.set_aside(step)
      logging.warning("%s; set aside as %s, resuming from the checkpoint before it", e, aside)
  return setup.init_state(), 0, None


def _restore(setup: build_lib.Setup, checkpointer: checkpoint_lib.Checkpointer, step: int):
  config, where = setup.config, checkpointer.step_dir(step)
  changes = []

  def check(meta: checkpoint_lib.Meta, has_train_state: bool) -> None:
    saved = meta.config
    if not has_train_state:  # an HF import: only its model is a given
      saved = {**config_lib.json_of(config), "model": saved.get("model", {})}
    changes.extend(config_lib.check_resume(saved, config, where))

  state, meta = setup.restore(checkpointer, step, check)
  if changes:  # said once the checkpoint has read back: a damaged one is not resumed
    logging.warning("Resuming %s with changed settings: %s", where, "; ".join(changes))
  with _device_reads():
    start_step = int(state.step)
  print(f"resuming from checkpoint at step {start_step} in {checkpointer.workdir.path}",
        flush=True)
  return state, start_step, processes.saved_data_state(meta.data_state)


def _train(setup: build_lib.Setup, workdir: WorkDir, stop_at_step: Optional[int],
           stops: interrupt.StopRequests) -> dict[str, Any]:
  config = setup.config
  primary = jax.process_index() == 0  # writes the workdir's shared files
  checkpointer = checkpoint_lib.Checkpointer(workdir.path, config.keep_checkpoints)
  state, start_step, data_state = _restore_or_init(setup, checkpointer)
  rows = processes.ProcessRows(setup.batch_sharding, config.global_batch_size)
  data = processes.make_process_data(config, rows)
  if primary:
    write_atomically(workdir.config,
                     config.to_json_best_effort(indent=2).encode())
    # The run's own copy of its tokenizer, for export (mixtral-convert) and inference.
    write_atomically(workdir.tokenizer,
                     data.tokenizer.serialized_model_proto())
  batches = data.train_iterator(data_state)
  saved_config = config_lib.json_of(config)
  last_step = min(config.num_train_steps, stop_at_step or config.num_train_steps)
  if start_step >= last_step:
    checkpointer.close()
    print(f"nothing to do: the checkpoint is at step {start_step}, the run ends at {last_step}")
    return {"resumed_step": start_step}
  # A signal that came while the run was starting stops it before the first step compiles
  # (minutes, for a large model): there is nothing new to save.
  stop_signal = stops.stop_after(start_step)
  if stop_signal is not None:
    checkpointer.close()
    raise interrupt.Interrupted(
        stop_signal, f"stopped by {signal.Signals(stop_signal).name} before step "
        f"{start_step + 1}: nothing new to save; run the same command again to "
        f"{'resume' if start_step else 'start'}")
  if jax.process_count() > 1:
    owner = np.vectorize(lambda d: d.process_index)(setup.mesh.devices)
    logging.info("Process of each mesh device (%s): %s", ", ".join(setup.mesh.axis_names),
                 owner.tolist())
  total, active = count_params(setup.abstract_state.params, setup.model_config)
  logging.info("Model: %s parameters, %s active per token.", f"{total:,}", f"{active:,}")
  print(f"model: {total:,} parameters ({active:,} active) | mesh "
        f"{dict(setup.mesh.shape)} | corpus unigram entropy {data.unigram_entropy:.3f} nats/token",
        flush=True)

  writer = metrics_lib.MetricsWriter(workdir.path, enabled=primary)
  writer.truncate(start_step)  # steps logged after the checkpoint are about to be redone
  progress = metrics_lib.ProgressBar(config.num_train_steps)
  tokens_per_step = config.global_batch_size * config.seq_len
  summary = {"first_loss": None, "final_loss": None}
  eval_metrics = {}

  def write_log(step: int, interval: _Interval, evaluated: dict) -> None:
    logged, streak, seconds_per_step = interval.mean()
    _check_finite(streak, step, config, checkpointer)
    logged["tokens_per_sec"] = tokens_per_step / seconds_per_step
    logged.update(evaluated)
    try:
      writer.write(step, logged)
    except metrics_lib.MetricsError as e:
      raise metrics_lib.MetricsError(
          f"{e}; {checkpoint_lib.last_complete(workdir.path)}") from None
    # The first step's time is mostly compilation: no ETA from it.
    progress.show(step, float(logged["loss"]), logged["tokens_per_sec"],
                  seconds_per_step if step > start_step + 1 else None)
    if summary["first_loss"] is None:
      summary["first_loss"] = float(logged["loss"])
    summary["final_loss"] = float(logged["loss"])

  profile = _Profile(config, workdir.profile, start_step)
  interval, pending = _Interval(), None
  for step in range(start_step + 1, last_step + 1):
    profile.before(step)
    state, metrics = setup.train_step(state, rows.global_batch(next(batches)))
    profile.after(step, state, is_last=False)
    interval.metrics.append(metrics)
    checkpointer.check()  # a save that failed in the background stops the run now
    if pending:  # the last log step's metrics, read now that this step is queued behind it
      write_log(*pending)
      pending = None
    log_step = step % config.log_every_steps == 0 or step == start_step + 1
    stop_signal = stops.stop_after(step)
    is_last = step == last_step or stop_signal is not None
    evaluated = {}
    if (config.eval_every_steps and step % config.eval_every_steps == 0 or
        step == config.num_train_steps):
      start = time.perf_counter()
      eval_metrics = evaluated = evaluate(setup, state.params, data, rows, config.eval_batches)
      interval.exclude(time.perf_counter() - start)
    if is_last or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0):
      with _device_reads():
        _check_finite(int(metrics["nonfinite_streak"]), step, config, checkpointer)
        checkpointer.save(step, state, checkpoint_lib.Meta(
            saved_config, batches.step, processes.gather_data_state(batches)))
    if log_step or is_last:
      pending, interval = (step, interval, evaluated), _Interval()
    elif evaluated:  # an eval step between log steps: its own record
      writer.write(step, evaluated)
    if is_last:
      break
  write_log(*pending)
  profile.after(step, state, is_last=True)  # a stop within the profiled steps ends the trace

  checkpointer.close()
  writer.close()
  if primary:
    plot.write(workdir.path)
  if stop_signal is not None:
    raise interrupt.Interrupted(
        stop_signal, f"stopped by {signal.Signals(stop_signal).name} at step {step}: checkpoint "
        f"{step} saved; run the same command again to resume")
  summary.update(unigram_entropy=data.unigram_entropy, **eval_metrics)
  print("done: " + json.dumps(summary), flush=True)
  return summary

