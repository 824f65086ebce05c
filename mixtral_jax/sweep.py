"""Config sweeps on Optuna: a sweep file's space, its study, and the workers that run its trials.

A sweep file (configs/sweeps/NAME.py) is a training config file with one more function:
`get_config()` is the base of every trial and `get_sweep()` the space, either a dict from config
field paths to lists of values (a grid) or a `Sweep` (a grid, or a random or TPE search over
`uniform`, `loguniform`, `intuniform` and `choice` ranges).

Each trial is `python -m mixtral_jax.main --config=SWEEP.py --workdir=DIR/trial_<n> …` with the
trial's values as --config.* flags: a process of its own, so a crash or OOM ends that trial
only, and the program a trial runs is the one users run. The study lives in Optuna's journal
storage, DIR/study.journal: an append-only log written under a file lock, which Optuna
recommends over SQLite for parallel workers (SQLite serialises writers on one database lock and
fails them with "database is locked" under contention), and it needs no server. A worker holds
DIR/trial_<n>/.sweep.lock while it drives trial n, so a trial still RUNNING in the study whose
lock is free was interrupted (a stopped sweep, or a killed driver, whose trials get one SIGTERM
through sweep_trial.py and save first): the next worker adopts it, and mixtral-train resumes it
from its checkpoint. `mixtral-sweep` (sweep_main.py) is the command line; sweep_results.py
writes the tables and plots; sweep_pod.py runs a sweep over a pod's processes.
"""

import copy
import dataclasses
import difflib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections
import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import TrialState

from mixtral_jax import config as config_lib
from mixtral_jax import metrics as metrics_lib
from mixtral_jax import sweep_pod
from mixtral_jax import sweep_results
from mixtral_jax.files import DirectoryLock, LockedError, write_atomically

METHODS = ("grid", "random", "tpe")
DIRECTIONS = ("minimize", "maximize")
STUDY_NAME = "sweep"


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


class SweepError(ValueError):
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


def _flag_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  return repr(value) if isinstance(value, float) else str(value)


def trial_flags(values: Mapping[str, Any]) -> list[str]:
  """The --config.* flags that set a trial's values."""
  return [f"--config.{path}={_flag_value(value)}" for path, value in values.items()]


def trial_dir(workdir: str, number: int) -> str:
  return os.path.join(workdir, f"trial_{number}")


def _storage(workdir: str, url: Optional[str]):
  """Optuna storage: the journal in `workdir` by default; a path ending in .journal is a journal
  there (a shared file system for several hosts); anything else an RDB URL (postgresql://…)."""
  if url and not url.endswith(".journal"):
    return url
  path = os.path.abspath(os.path.expanduser(url or os.path.join(workdir, "study.journal")))
  return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


def load_study(workdir: str, storage: Optional[str] = None,
               study_name: str = STUDY_NAME) -> optuna.Study:
  """The study of an existing sweep (for `mixtral-sweep status`); SweepError if there is none."""
  if storage is None and not os.path.exists(os.path.join(workdir, "study.journal")):
    raise SweepError(f"{workdir} holds no sweep (no study.journal); give --storage if the "
                     "sweep's study is elsewhere")
  try:
    return optuna.load_study(study_name=study_name, storage=_storage(workdir, storage))
  except KeyError:
    raise SweepError(f"no study named {study_name!r} in the storage of {workdir}") from None


def open_study(workdir: str, sweep: Sweep, storage: Optional[str] = None,
               study_name: str = STUDY_NAME) -> optuna.Study:
  """Creates the sweep's study, or loads it to continue; a grid's points are queued once, at
  creation. SweepError if the stored study searches another space."""
  if sweep.method == "tpe":
    sampler = optuna.samplers.TPESampler(seed=sweep.seed)
  else:  # a grid's trials are all queued with their values: the sampler never picks one
    sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
  space = describe(sweep)
  with DirectoryLock(workdir, ".study.lock"):  # two drivers started together queue one grid
    study = optuna.create_study(storage=_storage(workdir, storage), sampler=sampler,
                                pruner=sweep.pruner or optuna.pruners.NopPruner(),
                                study_name=study_name, direction=sweep.direction,
                                load_if_exists=True)
    stored = study.user_attrs.get("space")
    if stored is None:
      study.set_user_attr("space", space)
      if sweep.method == "grid":
        for point in grid_points(sweep):
          study.enqueue_trial(point)
    elif stored != space:
      raise SweepError(f"{workdir} holds a sweep over another space ({json.dumps(stored)}); "
                       "use a new --workdir (or --study_name) for this one")
  return study


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
      path = self._trial_dir(job["trial"])
      log_path = os.path.join(path, f"train_process_{self.pod.process_id}.log")
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
    with self._lock, DirectoryLock(self.workdir, ".ask.lock"):
      for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lock = DirectoryLock(self._trial_dir(frozen.number), ".sweep.lock")
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
      lock = DirectoryLock(self._trial_dir(trial.number), ".sweep.lock")
      lock.acquire()
      return trial, lock, False

  def _trial_dir(self, number: int) -> str:
    path = trial_dir(self.workdir, number)
    os.makedirs(path, exist_ok=True)
    return path

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
    number, values, path = trial.number, trial.params, self._trial_dir(trial.number)
    shown = " ".join(f"{k}={_flag_value(v)}" for k, v in values.items())
    try:
      trial_config(self.base, values)
    except SweepError as e:
      self.log(f"trial {number} ({shown}): invalid, not run: {e}")
      self._end(trial, TrialState.FAIL, f"invalid: {e}")
      return
    command = self.command + [f"--workdir={path}"] + self.overrides + trial_flags(values)
    write_atomically(os.path.join(path, "trial.json"), json.dumps(
        {"number": number, "params": values, "command": command}, indent=2).encode())
    log_path = os.path.join(path, "train.log")
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
    pruned_at = self._watch(trial, process, os.path.join(path, "metrics.jsonl"))
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
  """Starts `command` through sweep_trial.py, its output appended to `log_path`."""
  with open(log_path, "a") as log:
    # Its own session: a Ctrl-C in the driver's terminal reaches the trial from the driver,
    # once, and not a second time from the terminal.
    return subprocess.Popen([sys.executable, "-m", "mixtral_jax.sweep_trial"] + command,
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
