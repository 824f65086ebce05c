"""The workers that run a sweep's trials, each trial a `mixtral-train` process of its own.

Each trial is `python -m mixtral_jax.main --config=SWEEP.py --workdir=DIR/trial_<n> …` with the
trial's values as --config.* flags: a process of its own, so a crash or OOM ends that trial
only, and the program a trial runs is the one users run. The study lives in Optuna's journal
storage, DIR/study.journal: an append-only log written under a file lock, which Optuna
recommends over SQLite for parallel workers (SQLite serialises writers on one database lock and
fails them with "database is locked" under contention), and it needs no server. A worker holds
DIR/trial_<n>/.sweep.lock while it drives trial n, so a trial still RUNNING in the study whose
lock is free was interrupted (a stopped sweep, or a killed driver, whose trials get one SIGTERM
through trial.py and save first): the next worker adopts it, and mixtral-train resumes it
from its checkpoint.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import ml_collections
import optuna
from optuna.trial import TrialState

from mixtral_jax.runtime.files import DirectoryLock, LockedError, write_atomically
from mixtral_jax.runtime.workdir import SweepDir, WorkDir
from mixtral_jax.sweep import pod as sweep_pod
from mixtral_jax.sweep import results as sweep_results
from mixtral_jax.sweep.space import (Sweep, SweepError, distributions, flag_value, trial_config,
                                     trial_flags)
from mixtral_jax.training import metrics as metrics_lib


def _failure(code: int, log_path: str) -> str:
  """Why a trial's process failed: its last `error:` line, else its last line, and the code."""
  try:
    with open(log_path, errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    lines = []
  errors = [line for line in lines if line.startswith("error:")]
  last = (errors or lines or [""])[-1][:300]
  if code < 0 or code > 128:
    signum = -code if code < 0 else code - 128
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else signum
    how = f"killed by {name}" + (" (out of memory?)" if signum == signal.SIGKILL else "")
  else:
    how = f"exit code {code}"
  return f"{last} ({how})" if last else how


def visible_gpus() -> list[str]:
  """This host's GPUs, as CUDA_VISIBLE_DEVICES names them (its value if set), without starting
  a GPU runtime in the driver."""
  if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
    return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g]
  return sorted((name[len("nvidia"):] for name in os.listdir("/dev")
                 if name.startswith("nvidia") and name[len("nvidia"):].isdigit()), key=int)


def split_gpus(gpus: Sequence[str], workers: int) -> list[Optional[str]]:
  """Each worker's CUDA_VISIBLE_DEVICES: an equal share of `gpus` (None: no GPUs, no change)."""
  if not gpus:
    return [None] * workers
  if workers > len(gpus):
    raise SweepError(f"--workers={workers}: this host has {len(gpus)} GPUs; each worker needs "
                     "at least one")
  share = len(gpus) // workers
  return [",".join(gpus[i * share:(i + 1) * share]) for i in range(workers)]


class Driver:
  """Runs a study's trials in `workers` threads, each driving one training process at a time.

  `config_file` and `overrides` (--config.* flags) make each trial's command; `base` is that
  config as loaded, to check each point before its process starts. `stop` (an Event) ends the
  sweep at once: running trials get SIGTERM, checkpoint, and stay RUNNING for a rerun.
  """

  def __init__(self, study: optuna.Study, sweep: Sweep, base: ml_collections.ConfigDict,
               config_file: str, overrides: Sequence[str], workdir: str, workers: int = 1,
               poll_seconds: float = 1.0, log: Callable[[str], None] = print,
               pod: Optional[sweep_pod.Pod] = None):
    self.study, self.sweep, self.base, self.workdir = study, sweep, base, workdir
    self.sweep_dir = SweepDir(workdir)
    self.command = [sys.executable, "-u", "-m", "mixtral_jax.main", f"--config={config_file}"]
    self.overrides, self.workers, self.poll_seconds, self.log = list(overrides), workers, \
        poll_seconds, log
    self.stop = threading.Event()
    self._lock = threading.Lock()  # one thread at a time asks the study or writes results
    self._gpus = split_gpus(visible_gpus(), workers) if workers > 1 else [None]
    self.pod, self._jobs = pod, 0  # on a pod: the jobs announced to the other processes
    self._errors: list[Exception] = []
    if pod is not None and workers != 1:
      raise SweepError(f"--workers={workers}: on a pod each trial takes the whole mesh; "
                       "use --workers=1")

  def run(self) -> None:
    """Runs trials until the grid or the trial budget is done (or `stop` is set)."""
    threads = [threading.Thread(target=self._work, args=(i,), name=f"sweep-worker-{i}")
               for i in range(self.workers)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    if self.pod is not None:
      self.pod.announce(self._jobs, None)  # the other processes' drivers end too
    self.write_results()
    if self._errors:  # a worker that failed (not a trial: the driver itself, e.g. its storage)
      raise self._errors[0]

  def follow(self) -> None:
    """On processes 1 … N-1 of a pod: runs this process's part of each trial process 0
    announces, its output in DIR/trial_<n>/train_process_<i>.log."""

    def run(job: dict, env: dict) -> tuple[int, str]:
      log_path = SweepDir.trial_log(self._trial_dir(job["trial"]), self.pod.process_id)
      process = _launch(job["command"], log_path, env)
      while process.poll() is None:
        if self.stop.is_set():
          _terminate(process)
        try:
          process.wait(timeout=self.poll_seconds)
        except subprocess.TimeoutExpired:
          pass
      code = process.returncode
      return code, _failure(code, log_path) if code else ""

    sweep_pod.follow(self.pod, run, self.stop, self.log)

  def write_results(self) -> None:
    with self._lock:
      sweep_results.write(self.study, self.workdir)

  def _work(self, index: int) -> None:
    try:
      self._work_on(index)
    except Exception as e:  # re-raised by run(), once the other workers are done
      self._errors.append(e)

  def _work_on(self, index: int) -> None:
    env = dict(os.environ)
    if self._gpus[index] is not None:
      env["CUDA_VISIBLE_DEVICES"] = self._gpus[index]
    while not self.stop.is_set():
      job = self._next()
      if job is None:
        return
      self._drive(*job, env)

  def _next(self):
    """(trial, its held .sweep.lock, adopted?) for the next trial to drive, or None."""
    with self._lock, self.sweep_dir.lock("ask"):
      for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lock = SweepDir.trial_lock(self._trial_dir(frozen.number))
        try:
          lock.acquire()
        except LockedError:
          continue  # its worker lives
        if self._state(frozen.number) == TrialState.RUNNING:
          return optuna.trial.Trial(self.study, frozen._trial_id), lock, True
        lock.release()  # it ended while we looked
      trials = self.study.get_trials(deepcopy=False)
      if self.sweep.method == "grid":
        if not any(t.state == TrialState.WAITING for t in trials):
          return None
      elif len(trials) >= self.sweep.num_trials:
        return None
      trial = self.study.ask(distributions(self.sweep))
      lock = SweepDir.trial_lock(self._trial_dir(trial.number))
      lock.acquire()
      return trial, lock, False

  def _trial_dir(self, number: int) -> WorkDir:
    trial = self.sweep_dir.trial(number)
    os.makedirs(trial.path, exist_ok=True)
    return trial

  def _state(self, number: int) -> TrialState:
    return self._frozen(number).state

  def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)

  def _drive(self, trial: optuna.trial.Trial, lock: DirectoryLock, adopted: bool,
             env: dict) -> None:
    try:
      self._run_trial(trial, adopted, env)
    finally:
      lock.release()
    if not self.stop.is_set():
      self.write_results()

  def _end(self, trial: optuna.trial.Trial, state: TrialState, reason: str = "",
           value: Optional[float] = None) -> None:
    with self._lock:
      if reason:
        trial.set_user_attr("reason", reason)
      self.study.tell(trial, value, state=state)

  def _run_trial(self, trial: optuna.trial.Trial, adopted: bool, env: dict) -> None:
    number, values, run_dir = trial.number, trial.params, self._trial_dir(trial.number)
    path = run_dir.path
    shown = " ".join(f"{k}={flag_value(v)}" for k, v in values.items())
    try:
      trial_config(self.base, values)
    except SweepError as e:
      self.log(f"trial {number} ({shown}): invalid, not run: {e}")
      self._end(trial, TrialState.FAIL, f"invalid: {e}")
      return
    command = self.command + [f"--workdir={path}"] + self.overrides + trial_flags(values)
    write_atomically(SweepDir.trial_record(run_dir), json.dumps(
        {"number": number, "params": values, "command": command}, indent=2).encode())
    log_path = SweepDir.trial_log(run_dir)
    if adopted:
      self.log(f"trial {number} ({shown}) was interrupted; resuming it in {path}")
      with DirectoryLock(path):  # the old trial process checkpoints and exits on SIGTERM
        pass
    else:
      self.log(f"trial {number} ({shown}): started in {path}")
    start = time.monotonic()
    if self.pod is not None:  # every process of the pod starts its part of the trial
      coordinator = f"{self.pod.host}:{sweep_pod.free_port()}"
      env = self.pod.trial_env(env, coordinator)
      self.pod.announce(self._jobs, {"trial": number, "command": command,
                                     "coordinator": coordinator})
    process = _launch(command, log_path, env)
    pruned_at = self._watch(trial, process, run_dir.metrics)
    code = process.wait()
    reason = _failure(code, log_path) if code else ""
    if self.pod is not None:
      for process_id, other, why in self.pod.gather(self._jobs):
        if other and not code:
          code, reason = other, f"process {process_id}: {why}"
      self._jobs += 1
    seconds = time.monotonic() - start + self._frozen(number).user_attrs.get("seconds", 0.0)
    with self._lock:
      trial.set_user_attr("seconds", seconds)
    if pruned_at is None and code in _STOPPED and not self.stop.is_set():
      self.log(f"trial {number} was stopped by {signal.Signals(code - 128).name} from outside "
               "the sweep; the sweep stops")
      self.stop.set()
    if pruned_at is not None:
      step, value = pruned_at
      self.log(f"trial {number}: pruned at step {step} ({self.sweep.objective} {value:.4f})")
      self._end(trial, TrialState.PRUNED, f"pruned at step {step}")
    elif self.stop.is_set():
      self.log(f"trial {number}: stopped; a rerun resumes it")
    elif code != 0:
      self.log(f"trial {number}: failed: {reason}")
      self._end(trial, TrialState.FAIL, reason)
    else:
      logged = [r[self.sweep.objective] for r in metrics_lib.read_records(path)
                if self.sweep.objective in r]
      value = float(logged[-1]) if logged else None
      if value is None or not math.isfinite(value):
        reason = f"no finite {self.sweep.objective} in metrics.jsonl (got {value})"
        self.log(f"trial {number}: failed: {reason}")
        self._end(trial, TrialState.FAIL, reason)
      else:
        self.log(f"trial {number}: complete, {self.sweep.objective} {value:.4f} "
                 f"({seconds:.0f} s)")
        self._end(trial, TrialState.COMPLETE, value=value)

  def _watch(self, trial: optuna.trial.Trial, process: subprocess.Popen,
             metrics_path: str) -> Optional[tuple[int, float]]:
    """Reports the objective to the trial as the process logs it, until the process ends;
    terminates it on `stop` or when the pruner says so ((step, value) then)."""
    with self._lock:
      reported = set(self._frozen(trial.number).intermediate_values)
    offset = 0
    while True:
      ended = process.poll() is not None
      records, offset = _new_records(metrics_path, offset)
      for record in records:
        value, step = record.get(self.sweep.objective), record["step"]
        if value is None or step in reported:
          continue
        reported.add(step)
        with self._lock:
          trial.report(value, step)
          prune = trial.should_prune()
        if prune and not ended:
          _terminate(process)
          return step, value
      if ended:
        return None
      if self.stop.is_set():
        _terminate(process)
        return None
      try:  # returns as soon as the process ends: a sweep adds no wait to its trials
        process.wait(timeout=self.poll_seconds)
      except subprocess.TimeoutExpired:
        pass


# Exit codes of a trial that saved and stopped on a signal (SIGTERM, SIGINT): resumable.
_STOPPED = (128 + signal.SIGTERM, 128 + signal.SIGINT)


def _launch(command: list[str], log_path: str, env: dict) -> subprocess.Popen:
  """Starts `command` through trial.py, its output appended to `log_path`."""
  with open(log_path, "a") as log:
    # Its own session: a Ctrl-C in the driver's terminal reaches the trial from the driver,
    # once, and not a second time from the terminal.
    return subprocess.Popen([sys.executable, "-m", "mixtral_jax.sweep.trial"] + command,
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _terminate(process: subprocess.Popen) -> None:
  """SIGTERM (the trial saves a checkpoint and exits), then waits for it."""
  try:
    process.send_signal(signal.SIGTERM)
  except ProcessLookupError:
    pass
  process.wait()


def _new_records(path: str, offset: int) -> tuple[list[dict], int]:
  """The complete JSON lines of `path` from byte `offset` on, and the offset after them."""
  try:
    with open(path, "rb") as f:
      f.seek(offset)
      data = f.read()
  except FileNotFoundError:
    return [], offset
  if os.path.getsize(path) < offset:  # truncated by a resumed run: read it again
    return _new_records(path, 0)
  complete = data[:data.rfind(b"\n") + 1]
  records = []
  for line in complete.splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records, offset + len(complete)
