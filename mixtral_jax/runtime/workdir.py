"""The one place that names what lies in a run's directory and in a sweep's: every module asks a
`WorkDir` or a `SweepDir` for a path instead of spelling it."""

import dataclasses
import os

from mixtral_jax.runtime.files import DirectoryLock


class WorkDir:
  """A training run's directory (`mixtral-train --workdir`) and the paths in it."""

  def __init__(self, path: str):
    self.path = path
    # Orbax's directory: a `<step>` directory per complete checkpoint.
    self.checkpoints = os.path.abspath(os.path.join(path, "checkpoints"))
    # One JSON record per logged step (training/metrics.py), and TensorBoard's event files.
    self.metrics = os.path.join(path, "metrics.jsonl")
    self.tensorboard = os.path.join(path, "tensorboard")
    # The jax.profiler trace of config.profile_steps.
    self.profile = os.path.join(path, "profile")
    # The run's config as JSON (rewritten at each start) and its SentencePiece model, for export
    # and sampling.
    self.config = os.path.join(path, "config.json")
    self.tokenizer = os.path.join(path, "tokenizer.model")

  def lock(self) -> DirectoryLock:
    """The lock a training run holds on its directory."""
    return DirectoryLock(self.path)


@dataclasses.dataclass(frozen=True)
class SweepDir:
  """A sweep's directory (`mixtral-sweep --workdir`): its study, results and a `WorkDir` per
  trial, which also holds the trial's sweep files."""
  path: str

  @property
  def study_journal(self) -> str:
    """Optuna's journal storage (the default)."""
    return os.path.join(self.path, "study.journal")

  def trial(self, number: int) -> WorkDir:
    """Trial `number`'s training workdir."""
    return WorkDir(os.path.join(self.path, f"trial_{number}"))

  def result(self, name: str) -> str:
    """A results file: results.csv, results.md, eval_loss_curves.png, max_load_curves.png,
    objective_by_field.png."""
    return os.path.join(self.path, name)

  def lock(self, purpose: str) -> DirectoryLock:
    """The sweep's lock for `purpose`: "study" (creating it), "ask" (picking the next trial)."""
    return DirectoryLock(self.path, f".{purpose}.lock")

  @staticmethod
  def trial_lock(trial: WorkDir) -> DirectoryLock:
    """Held by the worker driving a trial, beside the trial run's own lock."""
    return DirectoryLock(trial.path, ".sweep.lock")

  @staticmethod
  def trial_record(trial: WorkDir) -> str:
    """The trial's number, values and command (trial.json)."""
    return os.path.join(trial.path, "trial.json")

  @staticmethod
  def trial_log(trial: WorkDir, process_id: int = 0) -> str:
    """The output of the trial's training process (of `process_id` on a pod's other hosts)."""
    name = "train.log" if process_id == 0 else f"train_process_{process_id}.log"
    return os.path.join(trial.path, name)
