"""A sweep's Optuna study: created with its space (a grid's points queued once), or loaded to
continue; stored in DIR/study.journal unless told otherwise (see driver.py on why a journal)."""

import json
import os
from typing import Optional

import optuna

from mixtral_jax.runtime.workdir import SweepDir
from mixtral_jax.sweep.space import Sweep, SweepError, describe, grid_points

STUDY_NAME = "sweep"



def _storage(workdir: str, url: Optional[str]):
  """Optuna storage: the journal in `workdir` by default; a path ending in .journal is a journal
  there (a shared file system for several hosts); anything else an RDB URL (postgresql://…)."""
  if url and not url.endswith(".journal"):
    return url
  path = os.path.abspath(os.path.expanduser(url or SweepDir(workdir).study_journal))
  return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


def load_study(workdir: str, storage: Optional[str] = None,
               study_name: str = STUDY_NAME) -> optuna.Study:
  """The study of an existing sweep (for `mixtral-sweep status`); SweepError if there is none."""
  if storage is None and not os.path.exists(SweepDir(workdir).study_journal):
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
  with SweepDir(workdir).lock("study"):  # two drivers started together queue one grid
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
