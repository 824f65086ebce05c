"""Training metrics: one JSON object per logged step in metrics.jsonl, the same values as
TensorBoard scalars in tensorboard/, and a console progress line."""

import json
import os
import sys
from typing import Any, Mapping, Optional

import numpy as np

# tensorboardX imports PyTorch whenever it is installed, for a type check on tensors we never
# pass (numpy only): 4 s of every start-up here. A None entry in sys.modules makes that one
# import fail as if torch were absent; a torch already loaded is left as it is.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
  sys.modules["torch"] = None
try:
  from tensorboardX import SummaryWriter  # noqa: E402
finally:
  if _HIDE_TORCH:
    del sys.modules["torch"]

from mixtral_jax.errors import UserError
from mixtral_jax.runtime.files import write_atomically
from mixtral_jax.runtime.workdir import WorkDir

_PER_LAYER = "_per_layer"


def _jsonable(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl in order ([] if there is none); a line cut short by a
  killed process is skipped."""
  records = []
  try:
    with open(WorkDir(workdir).metrics) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:
          continue
  except FileNotFoundError:
    pass
  return records


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """A record's TensorBoard scalars: each number under its name, each per-layer value as
  `NAME/layer_<l>` (NAME without "_per_layer"), expert load as `expert_load/layer_<l>/expert_<e>`."""
  tags = {}
  for name, value in record.items():
    if name == "step":
      continue
    array = np.asarray(value, np.float64)
    if array.ndim == 0:
      tags[name] = float(array)
    elif array.ndim == 1:
      base = name.removesuffix(_PER_LAYER)
      tags.update({f"{base}/layer_{l}": float(v) for l, v in enumerate(array)})
    elif array.ndim == 2:
      tags.update({f"{name}/layer_{l}/expert_{e}": float(v)
                   for l, row in enumerate(array) for e, v in enumerate(row)})
  return tags


class MetricsError(UserError, RuntimeError):
  """Writing metrics failed (e.g. a full disk); the message names the workdir and why."""


class MetricsWriter:
  """Appends `{"step": …, name: value, …}` lines to WORKDIR/metrics.jsonl and writes the same
  values (`scalars`) to TensorBoard event files in WORKDIR/tensorboard.

  Only an `enabled` writer writes: in a multi-process run the primary process, as the metrics
  are global and the workdir is shared.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.path = WorkDir(workdir).metrics
    self.enabled = enabled
    self._board_dir = WorkDir(workdir).tensorboard
    self._board: Optional[SummaryWriter] = None
    self._purge_step: Optional[int] = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      if self._board is None:
        # purge_step: TensorBoard drops the events a resumed run logs again.
        self._board = SummaryWriter(self._board_dir, purge_step=self._purge_step)
      for tag, value in scalars(record).items():
        self._board.add_scalar(tag, value, step)
      self._board.flush()
    except OSError as e:
      raise MetricsError(f"writing metrics in {self.workdir} failed ({e.strerror or e})") from None

  def truncate(self, last_step: int) -> None:
    """Drops the records after `last_step`, which a run resumed from there logs again (and a
    line cut short by a killed process)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    self._purge_step = last_step + 1
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= last_step:
            kept.append(line)
        except (ValueError, KeyError, TypeError):
          continue
    write_atomically(self.path, "".join(kept).encode())

  def close(self) -> None:
    if self._board is not None:
      self._board.close()
      self._board = None


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressBar:
  """Prints `step 120/600 [#####.....]  20% | loss 3.214 | 12,345 tok/s | ETA 2m10s`."""

  def __init__(self, total_steps: int, width: int = 24):
    self.total_steps = total_steps
    self.width = width

  def line(self, step: int, loss: float, tokens_per_sec: float,
           seconds_per_step: Optional[float]) -> str:
    """`seconds_per_step` None (e.g. a step that included compilation) prints no ETA."""
    frac = step / self.total_steps
    filled = int(round(frac * self.width))
    eta = "--" if seconds_per_step is None else _duration(
        seconds_per_step * (self.total_steps - step))
    return (f"step {step}/{self.total_steps} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{frac:4.0%} | loss {loss:.3f} | {tokens_per_sec:,.0f} tok/s | ETA {eta}")

  def show(self, step: int, loss: float, tokens_per_sec: float,
           seconds_per_step: Optional[float]) -> None:
    print(self.line(step, loss, tokens_per_sec, seconds_per_step), flush=True)
